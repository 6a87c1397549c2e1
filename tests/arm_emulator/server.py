"""A protocol-level emulator of Azure Resource Manager (ARM) for kiln's Azure cloud tests.

Real Azure cannot run here, so kiln carries its own ARM: an HTTP server on 127.0.0.1 that the
real azure-mgmt-resource, -network, -compute and -storage clients talk to unchanged (only the
token is fake, see `tests.arm_emulator.FakeCredential`). It keeps state for every resource type an
image build touches and answers with the status codes, long-running-operation headers and
operation-status resources each operation gets from the real service, per shared/reference/arm.md.

This module is the emulator itself: its settings, its HTTP entry point (where request faults are applied, see
faults.py) and the routing of a path to what serves it. The rest is split by concern:

* protocol.py: requests, answers, the error envelope and the checks every body gets; http_server.py: the server.
* rbac.py: the role each principal (bearer token) holds, checked on every ARM request before it is served.
* store.py: the resources; operations.py: long-running operations and their polling; crud.py: the PUT, GET,
  PATCH, DELETE, listing and action machinery every resource type shares.
* One module per resource provider, each registering its types with their rules as hooks (see provider.py):
  resources.py (Microsoft.Resources), network.py (Microsoft.Network), compute/ (Microsoft.Compute),
  storage.py (Microsoft.Storage). A new type, or a new rule of one, goes there.
* blobs.py and blob_proxy.py: the blob service behind storage accounts and disk exports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from . import compute, crud, network, operations, rbac, resources, storage
from .blob_proxy import BlobProxy
from .blobs import Azurite, ServedBlobs, fixed_vhd
from .compute.names import VIRTUAL_MACHINES
from .compute.platform_images import PlatformImage
from .compute.vm import GuestEndpoint, GuestSpec
from .faults import Faults
from .http_server import HttpServer, make_server, read_request, write
from .operations import Operation
from .protocol import ArmError, Call, Request, Response, error, storage_error
from .provider import Route
from .store import Store, tags_match

_PROVIDERS = (resources.PROVIDER, network.PROVIDER, compute.PROVIDER, storage.PROVIDER)
_TYPES = {t.key: t for provider in _PROVIDERS for t in provider.types}
# Served after the api-version check; no two of these patterns match the same path.
_ROUTES = (*(r for provider in _PROVIDERS for r in provider.routes), *crud.ROUTES)

# The error code an injected fault answers with when the test names none.
_DEFAULT_CODES = {
    400: "BadRequest",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


class ArmEmulator:
    """The emulator. `start()` serves on a free 127.0.0.1 port and returns the base URL.

    Settings are plain attributes and may change while it runs: `operation_polls` (InProgress
    answers per LRO), `poll_ms` (the retry-after-ms hint), `platform_images` (the marketplace
    catalogue, keyed by `(publisher, offer, sku)`, matched case-insensitively), `guest_factory`,
    `run_command` (callable `(vm_id, request_body) -> (stdout, stderr)`) and `vhd` (the bytes every
    disk export serves). Blob data goes to `azurite` when given, else to a read-only server built in;
    `proxy_storage` routes storage accounts' blob traffic through the emulator (see blob_proxy.py).
    `snapshot_copy_polls` (see compute/disks.py) and `blob_copy_polls` (see blob_proxy.py) pace copies.
    `roles` maps a bearer token to the role assigned to that principal (see rbac.py); other tokens act as Owner.
    `listing_lag` is how many seconds the listing of every resource (`/resources`) runs behind (see store.py).
    `nic_reservation` is how many seconds a NIC stays reserved for a VM that is gone (see compute/vm.py).

    `store`, `operations`, `types` and `lock` are the state the provider modules work on; whatever changes the
    store or the operations, or walks over them, holds `lock`.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        operation_polls: int = 1,
        poll_ms: int = 10,
        azurite: Azurite | None = None,
        platform_images: dict[tuple[str, str, str], PlatformImage] | None = None,
        guest_factory: Callable[[GuestSpec], GuestEndpoint] | None = None,
        run_command: Callable[[str, dict[str, Any]], tuple[str, str]] | None = None,
        proxy_storage: bool = False,
        roles: dict[str, rbac.Role] | None = None,
    ) -> None:
        if proxy_storage and azurite is None:
            raise ValueError("proxy_storage passes blob requests on to Azurite: give azurite too")
        self.faults = Faults()
        self.calls: list[Call] = []
        self.operation_polls = operation_polls
        self.poll_ms = poll_ms
        self.platform_images = dict(platform_images or {})
        self.guest_factory = guest_factory
        self.run_command = run_command or (lambda vm_id, body: ("", ""))
        self.roles = dict(roles or {})
        self.vhd = fixed_vhd()
        self.snapshot_copy_polls: int | None = 1
        self.blob_copy_polls: int | None = 0
        self.listing_lag = 0.0
        self.nic_reservation = 180.0
        self.blobs: Azurite | ServedBlobs | None = azurite
        self.blob_proxy = BlobProxy(azurite) if proxy_storage and azurite is not None else None
        self._azurite = azurite
        self.store = Store()
        self.operations: dict[str, Operation] = {}
        self.types = _TYPES
        self.lock = threading.RLock()
        self.base_url = ""
        self._port = port
        self._server: HttpServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle and public view

    def start(self) -> str:
        self._server = make_server(self._port, self._serve)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        if self._azurite is None:
            self.blobs = ServedBlobs(self.base_url)
        # A short select timeout makes stop() (which waits for the loop to notice) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="arm-emulator", daemon=True
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            for res in self.store:
                crud.release(self, res)

    def __enter__(self) -> ArmEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def resources(self, tag_filter: dict[str, str | None] | None = None) -> list[dict[str, Any]]:
        """Every resource that exists (resource groups included), as GET would show it.

        `tag_filter` keeps those carrying every given tag; a None value matches any value.
        """
        with self.lock:
            found = [crud.render(self, r) for r in self.store]
        return [r for r in found if tags_match(r.get("tags") or {}, tag_filter or {})]

    def guest(self, vm: str) -> GuestEndpoint | None:
        """The guest endpoint of a VM, by ARM id or by name (first match)."""
        with self.lock:
            for res in self.store:
                if res.type == VIRTUAL_MACHINES and vm.lower() in (res.key, res.name.lower()):
                    return res.state.get("guest")
        return None

    # ----------------------------------------------------------------- HTTP entry point

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        if self._server is None:
            # Stopped: a kept-alive connection (say, a poller still polling a hung operation) is
            # cut instead of being served by a dead emulator for the rest of the test session.
            h.close_connection = True
            return
        at, started = time.time(), time.perf_counter()
        req = read_request(h)
        fault = self.faults.request_fault(req.method, req.path)
        if fault is not None:
            time.sleep(fault.delay)
            if fault.drop:
                h.close_connection = True
                self.calls.append(Call(req.method, req.path, 0, at, time.perf_counter() - started))
                return
        if fault is not None and fault.status is not None:
            resp = (storage_error if self._is_blob_traffic(req) else error)(
                fault.status,
                fault.code or _DEFAULT_CODES.get(fault.status, "InjectedFault"),
                fault.message or "Fault injected by the ARM emulator.",
            )
            if fault.retry_after is not None:
                resp.headers["Retry-After"] = str(fault.retry_after)
        else:
            try:
                resp = self._route(req)
            except ArmError as e:
                resp = error(e.status, e.code, e.message)
            except Exception as e:  # an emulator bug: make it visible to the test, not a dropped socket
                resp = error(500, "InternalServerError", f"ARM emulator failure: {e!r}")
            if fault is not None:
                time.sleep(fault.answer_delay)
        # Logged before the answer goes out, so a caller that has its answer finds its call in the log.
        self.calls.append(Call(req.method, req.path, resp.status, at, time.perf_counter() - started))
        write(h, req.method, resp)

    def _is_blob_traffic(self, req: Request) -> bool:
        return self.blob_proxy is not None and self.blob_proxy.covers(req.path)

    def _route(self, req: Request) -> Response:
        if self._is_blob_traffic(req):
            assert self.blob_proxy is not None
            return self.blob_proxy.serve(req, self.blob_copy_polls)
        segs = [s for s in req.path.split("/") if s]
        if len(segs) >= 2 and segs[0].lower() == "_blobs" and isinstance(self.blobs, ServedBlobs):
            return self.blobs.answer(req, segs[1])
        if len(segs) < 2 or segs[0].lower() != "subscriptions":
            raise ArmError(404, "NotFound", f"No route for {req.path}.")
        if not (req.authorization or "").startswith("Bearer "):
            # ARM refuses anonymous calls; any token is accepted, so a missing one is a client bug.
            raise ArmError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
        sub, path = segs[1], "/".join(segs[2:])
        answer = _first_answer(operations.ROUTES, self, req, sub, path)
        if answer is not None:
            return answer
        if "api-version" not in req.query:
            raise ArmError(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        rbac.authorize(self, req, sub, path)
        answer = _first_answer(_ROUTES, self, req, sub, path)
        if answer is not None:
            return answer
        raise ArmError(404, "NotFound", f"No route for {req.path}.")


def _first_answer(routes: tuple[Route, ...], arm: ArmEmulator, req: Request, sub: str, path: str) -> Response | None:
    for route in routes:
        answer = route.answer(arm, req, sub, path)
        if answer is not None:
            return answer
    return None
