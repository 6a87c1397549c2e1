"""A protocol-level emulator of Azure Resource Manager (ARM) for kiln's Azure cloud tests.

Real Azure cannot run here, so kiln carries its own ARM: an HTTP server on 127.0.0.1 that the
real azure-mgmt-resource, -network, -compute and -storage clients talk to unchanged (only the
token is fake, see `tests.arm_emulator.FakeCredential`). It keeps state for every resource type an
image build touches and answers with the status codes, long-running-operation headers and
operation-status resources each operation gets from the real service, per
shared/reference/arm.md:

* PUT of compute, network and gallery resources: 201 (new) / 200 (update) with a non-terminal
  provisioningState and Azure-AsyncOperation, never Location. Disks and snapshots: 202 / 200.
  Storage accounts: 202 with Location only. Resource groups: synchronous 201 / 200.
* DELETE: 202 with both Azure-AsyncOperation and Location (204 when already gone); resource
  groups 202 with Location only, deleting everything inside; storage accounts synchronous.
* POST actions (start, powerOff, deallocate, restart, runCommand, capture, beginGetAccess,
  endGetAccess): 202 with both headers; the Location URL answers 202 while running and 200 with
  the result afterwards, for ever, because the legacy SDK GETs it once more. `generalize` and
  `listKeys` are synchronous 200.
* Every LRO answer carries `retry-after-ms`, which the SDK honours over its 30 s default
  polling interval, so tests run fast without touching client settings. An operation answers
  InProgress for `operation_polls` polls and then ends; faults change that (see faults.py).

Deliberate strictness beyond ARM: request bodies with snake_case keys are refused with 400,
because the current SDKs send a dict verbatim and real Azure would silently ignore such keys.

Storage faults: with `proxy_storage`, storage accounts' blob endpoints point at the emulator itself,
which passes every blob request on to Azurite unchanged (the signed path is the same) and so applies
request faults to blob traffic too; those are answered as the blob service answers errors (XML body,
`x-ms-error-code`).

Copies that outlast their call: a snapshot made with `creationData.createOption` CopyStart (incremental
only, from a snapshot, usually into another region) is created at once and then reports `completionPercent`
below 100 for `snapshot_copy_polls` GETs; an image or disk cannot be made from it until then, and an image
whose source is in another region is refused (400), as in ARM. With `proxy_storage`, a server-side blob copy
(Put Blob with `x-ms-copy-source`) reports `x-ms-copy-status: pending` for `blob_copy_polls` reads of the
destination (Azurite itself finishes copies at once). Either setting None keeps the copy going until a test
sets a number. A create or update (a gallery image version's replication too) moves on with each poll of its
operation and each GET of the resource, so a caller that lost the operation can still watch the resource end.

Platform images: `platform_images` is the marketplace catalogue that the VirtualMachineImages list
and get endpoints serve (see `PlatformImage`); a VM created from a catalogue image that has a
purchase plan must carry that plan, as in ARM.

Guest execution: a VM's NIC private IP and public IP are loopback addresses. A test sets
`guest_factory` to start something that answers SSH for the VM (the local cloud's VM code can
serve as a real guest) and returns where it listens; see `GuestSpec` / `GuestEndpoint`.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from .blob_proxy import BlobProxy
from .blobs import Azurite, ServedBlobs, fixed_vhd
from .faults import Faults
from .http_server import HttpServer, make_server, read_request, write
from .protocol import (
    ENVELOPE,
    ArmError,
    Call,
    Request,
    Response,
    check_rest_shape,
    error,
    method_not_allowed,
    now,
    operation_not_allowed,
    region_name,
    storage_error,
)


@dataclass(frozen=True)
class GuestSpec:
    """What a guest factory learns about a new VM: enough to start a machine that accepts the
    credentials kiln put into the VM's osProfile."""

    vm_id: str
    name: str
    computer_name: str | None
    os_type: str
    admin_username: str | None
    admin_password: str | None
    ssh_public_keys: tuple[str, ...]
    image_reference: dict[str, Any]


@dataclass(frozen=True)
class GuestEndpoint:
    """Where a VM's guest answers. `host` is what the VM's NIC and public IP report; `port` is
    for the test to hand to kiln, since a loopback guest rarely listens on 22. `close` runs when
    the VM is deleted."""

    host: str = "127.0.0.1"
    port: int = 22
    close: Callable[[], None] | None = None


@dataclass(frozen=True)
class PlatformImage:
    """One marketplace SKU (publisher/offer/sku) and its versions, as VirtualMachineImages serves it.

    `plan` is the purchase plan (`{"name", "product", "publisher"}`) a VM made from it must name;
    `locations` limits the regions that offer it (None: every region).
    """

    versions: tuple[str, ...] | list[str]
    os_type: str = "Linux"
    hyper_v_generation: str = "V1"
    plan: dict[str, str] | None = None
    architecture: str = "x64"
    locations: tuple[str, ...] | None = None

    def offered_in(self, location: str) -> bool:
        return self.locations is None or region_name(location) in {region_name(loc) for loc in self.locations}


@dataclass(frozen=True)
class _Type:
    name: str  # canonical, e.g. Microsoft.Compute/galleries/images/versions
    put: str  # "aao201" | "aao202" | "location"
    delete: str = "async"  # "async" | "sync"
    tracked: bool = True  # tracked resources carry their own location
    creating: str = "Creating"

    @property
    def key(self) -> str:
        return self.name.lower()


_TYPES = {
    t.key: t
    for t in (
        _Type("Microsoft.Storage/storageAccounts", "location", delete="sync"),
        _Type("Microsoft.Network/virtualNetworks", "aao201", creating="Updating"),
        _Type("Microsoft.Network/virtualNetworks/subnets", "aao201", tracked=False, creating="Updating"),
        _Type("Microsoft.Network/networkSecurityGroups", "aao201", creating="Updating"),
        _Type("Microsoft.Network/publicIPAddresses", "aao201", creating="Updating"),
        _Type("Microsoft.Network/networkInterfaces", "aao201", creating="Updating"),
        _Type("Microsoft.Compute/virtualMachines", "aao201"),
        _Type("Microsoft.Compute/virtualMachines/runCommands", "aao201"),
        _Type("Microsoft.Compute/disks", "aao202"),
        _Type("Microsoft.Compute/snapshots", "aao202"),
        _Type("Microsoft.Compute/images", "aao201"),
        _Type("Microsoft.Compute/galleries", "aao201"),
        _Type("Microsoft.Compute/galleries/images", "aao201"),
        _Type("Microsoft.Compute/galleries/images/versions", "aao201"),
    )
}
_GROUP_TYPE = "Microsoft.Resources/resourceGroups"

# Deleting a resource that one of the user types still references fails in ARM with these answers
# (network answers 400, compute 409). Other references (a snapshot's source disk) do not block.
_NICS, _VMS = "Microsoft.Network/networkInterfaces", "Microsoft.Compute/virtualMachines"
_SUBNETS = "Microsoft.Network/virtualNetworks/subnets"
_IN_USE = {
    "microsoft.network/networksecuritygroups": (400, "InUseNetworkSecurityGroupCannotBeDeleted", {_NICS, _SUBNETS}),
    "microsoft.network/virtualnetworks": (400, "InUseSubnetCannotBeDeleted", {_NICS}),
    "microsoft.network/virtualnetworks/subnets": (400, "InUseSubnetCannotBeDeleted", {_NICS}),
    "microsoft.network/networkinterfaces": (400, "NicInUse", {_VMS}),
    "microsoft.network/publicipaddresses": (400, "PublicIPAddressCannotBeDeleted", {_NICS}),
    "microsoft.compute/disks": (409, "OperationNotAllowed", {_VMS}),
}


@dataclass
class _Resource:
    id: str
    type: str
    envelope: dict[str, Any]
    properties: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)  # emulator-only: power state, guest, ...

    @property
    def key(self) -> str:
        return self.id.lower()

    @property
    def name(self) -> str:
        return self.id.rsplit("/", 1)[1]


@dataclass
class _Operation:
    id: str
    # InProgress answers before the end, None for never. Read at every poll, so a test that
    # hung an operation can release it by changing the fault's `polls`.
    limit: Callable[[], int | None]
    succeed: Callable[[], dict[str, Any] | None]  # applies the effect, returns the result body
    fail: Callable[[], None]
    error: dict[str, str] | None = None
    http_status: int = 409
    polls: int = 0
    status: str = "InProgress"
    result: dict[str, Any] | None = None
    started: str = field(default_factory=now)
    ended: str | None = None


class ArmEmulator:
    """The emulator. `start()` serves on a free 127.0.0.1 port and returns the base URL.

    Settings are plain attributes and may change while it runs: `operation_polls` (InProgress
    answers per LRO), `poll_ms` (the retry-after-ms hint), `platform_images` (the marketplace
    catalogue, keyed by `(publisher, offer, sku)`, matched case-insensitively), `guest_factory`,
    `run_command` (callable `(vm_id, request_body) -> (stdout, stderr)`) and `vhd` (the bytes every
    disk export serves). Blob data goes to `azurite` when given, else to a read-only server built in;
    `proxy_storage` routes storage accounts' blob traffic through the emulator (see the module notes).
    `snapshot_copy_polls` and `blob_copy_polls` pace copies (see the module notes).
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
        self.vhd = fixed_vhd()
        self.snapshot_copy_polls: int | None = 1
        self.blob_copy_polls: int | None = 0
        self._port = port
        self._azurite = azurite
        self.blobs: Azurite | ServedBlobs | None = azurite
        self._blob_proxy = BlobProxy(azurite) if proxy_storage and azurite is not None else None
        self._store: dict[str, _Resource] = {}
        self._ops: dict[str, _Operation] = {}
        self._lock = threading.RLock()
        self._server: HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

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
        with self._lock:
            for res in self._store.values():
                self._close_guest(res)

    def __enter__(self) -> ArmEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def resources(self, tag_filter: dict[str, str | None] | None = None) -> list[dict[str, Any]]:
        """Every resource that exists (resource groups included), as GET would show it.

        `tag_filter` keeps those carrying every given tag; a None value matches any value.
        """
        with self._lock:
            found = [self._render(r) for r in self._store.values()]
        return [r for r in found if _tags_match(r.get("tags") or {}, tag_filter or {})]

    def guest(self, vm: str) -> GuestEndpoint | None:
        """The guest endpoint of a VM, by ARM id or by name (first match)."""
        with self._lock:
            for res in self._store.values():
                if res.type == "Microsoft.Compute/virtualMachines" and vm.lower() in (res.key, res.name.lower()):
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
        return self._blob_proxy is not None and self._blob_proxy.covers(req.path)

    def _route(self, req: Request) -> Response:
        if self._is_blob_traffic(req):
            assert self._blob_proxy is not None
            return self._blob_proxy.serve(req, self.blob_copy_polls)
        segs = [s for s in req.path.split("/") if s]
        low = [s.lower() for s in segs]
        if low[:1] == ["_blobs"] and len(segs) >= 2 and isinstance(self.blobs, ServedBlobs):
            return self.blobs.answer(req, segs[1])
        if len(segs) < 2 or low[0] != "subscriptions":
            raise ArmError(404, "NotFound", f"No route for {req.path}.")
        if not (req.authorization or "").startswith("Bearer "):
            # ARM refuses anonymous calls; any token is accepted, so a missing one is a client bug.
            raise ArmError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
        sub, rest, lrest = segs[1], segs[2:], low[2:]
        # Operation URLs are minted here with api-version inside; the SDK GETs them verbatim.
        if len(rest) == 2 and lrest[0] == "operationresults":
            return self._poll(req, rest[1], via="location")
        if (
            len(rest) == 6
            and lrest[0] == "providers"
            and lrest[2] == "locations"
            and lrest[4] in ("operations", "operationresults")
        ):
            return self._poll(req, rest[5], via="aao" if lrest[4] == "operations" else "location")
        if "api-version" not in req.query:
            raise ArmError(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if (
            len(rest) in (13, 14)
            and lrest[:3] == ["providers", "microsoft.compute", "locations"]
            and lrest[4] == "publishers"
            and lrest[6:9] == ["artifacttypes", "vmimage", "offers"]
            and lrest[10] == "skus"
            and lrest[12] == "versions"
        ):
            return self._platform_image(
                req, sub, *(unquote(rest[i]) for i in (3, 5, 9, 11)), [unquote(v) for v in rest[13:]]
            )
        if lrest == ["resourcegroups"] and req.method == "GET":
            return self._list(sub, None, _GROUP_TYPE, req)
        if len(rest) == 2 and lrest[0] == "resourcegroups":
            return self._group(req, sub, rest[1])
        if lrest == ["resources"] and req.method == "GET":
            return self._list(sub, None, None, req)
        if len(rest) == 3 and lrest[0] == "resourcegroups" and lrest[2] == "resources" and req.method == "GET":
            self._require_group(sub, rest[1])
            return self._list(sub, rest[1], None, req)
        if len(rest) == 3 and lrest[0] == "providers" and req.method == "GET":
            return self._list(sub, None, self._type(rest[1], [rest[2]]).name, req)
        if len(rest) >= 5 and lrest[0] == "resourcegroups" and lrest[2] == "providers":
            return self._provider(req, sub, rest[1], rest[3], rest[4:])
        raise ArmError(404, "NotFound", f"No route for {req.path}.")

    def _provider(self, req: Request, sub: str, group: str, ns: str, parts: list[str]) -> Response:
        if len(parts) % 2 == 0:
            spec = self._type(ns, parts[0::2])
            return self._resource(req, sub, group, spec, parts[1::2])
        if len(parts) == 1:
            self._require_group(sub, group)
            return self._list(sub, group, self._type(ns, parts).name, req)
        owner_spec = self._type(ns, parts[:-1:2])
        owner_id = self._id(sub, group, owner_spec, parts[1::2])
        child = _TYPES.get(f"{owner_spec.key}/{parts[-1].lower()}")
        if child is not None and req.method == "GET":
            with self._lock:
                self._require_group(sub, group)
                self._get(owner_id)
            return self._list_children(owner_id, child, req)
        return self._action(req, owner_id, owner_spec, parts[-1].lower())

    def _type(self, ns: str, types: list[str]) -> _Type:
        spec = _TYPES.get("/".join([ns, *types]).lower())
        if spec is None:
            raise ArmError(
                400,
                "InvalidResourceType",
                f"The resource type '{'/'.join(types)}' could not be found in the namespace '{ns}'.",
            )
        return spec

    def _id(self, sub: str, group: str, spec: _Type, names: list[str]) -> str:
        ns, *types = spec.name.split("/")
        pairs = "/".join(f"{t}/{n}" for t, n in zip(types, names, strict=True))
        return f"{self._group_id(sub, group)}/providers/{ns}/{pairs}"

    def _group_id(self, sub: str, group: str) -> str:
        default = f"/subscriptions/{sub}/resourceGroups/{group}"
        existing = self._store.get(default.lower())
        return existing.id if existing else default

    # ----------------------------------------------------------------- platform images

    def _catalogue_entry(self, publisher: str, offer: str, sku: str) -> PlatformImage | None:
        wanted = (publisher.lower(), offer.lower(), sku.lower())
        return next(
            (image for key, image in list(self.platform_images.items()) if tuple(k.lower() for k in key) == wanted),
            None,
        )

    def _platform_image(
        self, req: Request, sub: str, location: str, publisher: str, offer: str, sku: str, version: list[str]
    ) -> Response:
        """VirtualMachineImages list (a bare JSON array, ascending by version unless $orderby says
        otherwise, $top honoured) and get. The ids use ARM's capitalised form and echo the request's
        publisher/offer/sku; an unknown SKU, version or region is 404 NotFound, as ARM answers it."""
        if req.method != "GET":
            raise method_not_allowed(req)
        image = self._catalogue_entry(publisher, offer, sku)
        region = region_name(location)
        if image is None or not image.offered_in(region) or (version and version[0] not in image.versions):
            raise ArmError(404, "NotFound", "Artifact: VMImage was not found.")
        base = (
            f"/Subscriptions/{sub}/Providers/Microsoft.Compute/Locations/{region}/Publishers/{publisher}"
            f"/ArtifactTypes/VMImage/Offers/{offer}/Skus/{sku}/Versions"
        )
        if version:
            return Response(200, _image_version(image, base, region, version[0], with_properties=True))
        order = re.fullmatch(r"\s*name(?:\s+(asc|desc))?\s*", req.query.get("$orderby", "name"), re.IGNORECASE)
        if order is None:
            raise ArmError(400, "InvalidParameter", f"$orderby '{req.query['$orderby']}' is not supported.")
        names = sorted(image.versions, key=_version_key, reverse=(order.group(1) or "").lower() == "desc")
        top = req.query.get("$top")
        if top is not None:
            if not top.isdigit():
                raise ArmError(400, "InvalidParameter", f"$top '{top}' is not a non-negative integer.")
            names = names[: int(top)]
        expand = req.query.get("$expand", "").lower() == "properties"
        return Response(200, [_image_version(image, base, region, v, with_properties=expand) for v in names])

    # ----------------------------------------------------------------- resource groups

    def _group(self, req: Request, sub: str, name: str) -> Response:
        with self._lock:
            gid = self._group_id(sub, name)
            group = self._store.get(gid.lower())
            if req.method == "HEAD":
                return Response(204 if group else 404)
            if req.method == "PUT":
                body = req.json()
                check_rest_shape(body)
                if not body.get("location"):
                    raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
                if group and group.properties["provisioningState"] == "Deleting":
                    raise _group_being_deleted(name)
                if len(name) > 90 or not re.fullmatch(r"[-\w._()]+", name) or name.endswith("."):
                    raise ArmError(400, "InvalidResourceGroupName", f"Resource group name '{name}' is invalid.")
                envelope = {"location": body["location"], "tags": body.get("tags") or {}}
                if group:
                    group.envelope = envelope
                    return Response(200, self._render(group))
                group = _Resource(gid, _GROUP_TYPE, envelope, {"provisioningState": "Succeeded"})
                self._store[group.key] = group
                return Response(201, self._render(group))
            if group is None:
                raise _group_not_found(name)
            if req.method == "GET":
                return Response(200, self._render(group))
            if req.method == "PATCH":
                body = req.json()
                if "tags" in body:
                    group.envelope["tags"] = body["tags"] or {}
                return Response(200, self._render(group))
            if req.method == "DELETE":
                return self._delete_group(req, group)
        raise method_not_allowed(req)

    def _delete_group(self, req: Request, group: _Resource) -> Response:
        prefix = group.key + "/"
        before = group.properties["provisioningState"]
        group.properties["provisioningState"] = "Deleting"

        def succeed() -> None:
            for key in [k for k in self._store if k.startswith(prefix) or k == group.key]:
                self._close_guest(self._store.pop(key))
            return None

        def fail() -> None:
            group.properties["provisioningState"] = before

        op = self._operation(req, succeed, fail)
        sub = group.id.split("/")[2]
        location = f"{req.origin}/subscriptions/{sub}/operationresults/{op.id}?api-version={req.query['api-version']}"
        return Response(202, None, {"Location": location, "retry-after-ms": str(self.poll_ms)})

    def _require_group(self, sub: str, group: str) -> _Resource:
        res = self._store.get(f"/subscriptions/{sub}/resourcegroups/{group}".lower())
        if res is None:
            raise _group_not_found(group)
        return res

    # ----------------------------------------------------------------- generic resources

    def _resource(self, req: Request, sub: str, group: str, spec: _Type, names: list[str]) -> Response:
        with self._lock:
            rg = self._require_group(sub, group)
            rid = self._id(sub, group, spec, names)
            if req.method == "GET":
                res = self._get(rid)
                if "copy_polls" in res.state and res.properties.get("provisioningState") == "Succeeded":
                    res.state["copy_polls"] += 1
                if "operation" in res.state:
                    # ARM's work goes on whether or not its operation is polled: reading the resource counts too.
                    self._advance(res.state["operation"])
                return Response(200, self._render(res, req.query.get("$expand")))
            if req.method == "HEAD":
                return Response(204 if rid.lower() in self._store else 404)
            if req.method == "PUT":
                resp, new_vm = self._put(req, rg, spec, rid)
            elif req.method == "PATCH":
                return self._patch(req, self._get(rid))
            elif req.method == "DELETE":
                return self._delete(req, spec, rid)
            else:
                raise method_not_allowed(req)
        if new_vm is not None:
            # Booting a guest can take a while; it must not hold the lock every request needs.
            self._boot_guest(new_vm)
        return resp

    def _get(self, rid: str) -> _Resource:
        res = self._store.get(rid.lower())
        if res is None:
            parts = rid.split("/")
            group = parts[4]
            kind = "/".join(parts[6:7] + parts[7::2])
            name = "/".join(parts[8::2])
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource '{kind}/{name}' under resource group '{group}' was not found. "
                "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
            )
        return res

    def _put(self, req: Request, rg: _Resource, spec: _Type, rid: str) -> tuple[Response, _Resource | None]:
        if rg.properties["provisioningState"] == "Deleting":
            raise _group_being_deleted(rg.name)
        if spec.name.count("/") > 1:
            parent_id = rid.rsplit("/", 2)[0]
            if parent_id.lower() not in self._store:
                raise ArmError(
                    404,
                    "ParentResourceNotFound",
                    f"Can not perform requested operation on nested resource. Parent resource "
                    f"'{parent_id.rsplit('/', 1)[1]}' not found.",
                )
        body = req.json()
        check_rest_shape(body)
        if spec.tracked and not body.get("location"):
            raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
        existing = self._store.get(rid.lower())
        if existing is not None and existing.properties.get("provisioningState") == "Deleting":
            raise ArmError(409, "Conflict", f"Resource '{existing.name}' is being deleted.")
        res = _Resource(
            existing.id if existing else rid,
            spec.name,
            {k: body[k] for k in ENVELOPE if k in body},
            copy.deepcopy(body.get("properties") or {}),
            existing.state if existing else {},
        )
        if spec.tracked:
            res.envelope.setdefault("tags", {})
        prepare = getattr(self, "_prepare_" + spec.name.split("/", 1)[1].replace("/", "_"), None)
        if prepare is not None:
            prepare(res, existing, req)
        res.properties["provisioningState"] = "Updating" if existing else spec.creating
        self._store[res.key] = res

        def succeed() -> dict[str, Any] | None:
            res.properties["provisioningState"] = "Succeeded"
            ready = getattr(self, "_ready_" + spec.name.split("/", 1)[1].replace("/", "_"), None)
            if ready is not None:
                ready(res)
            return self._render(res)

        def fail() -> None:
            res.properties["provisioningState"] = "Failed"

        gallery_version = spec.name.endswith("/versions")
        op = self._operation(req, succeed, fail, self._replication_limit(res) if gallery_version else None)
        res.state["operation"] = op
        new_vm = res if spec.name == "Microsoft.Compute/virtualMachines" and existing is None else None
        if spec.put == "location":
            return Response(202, None, self._lro_headers(req, res, op, aao=False)), new_vm
        status = 200 if existing else (202 if spec.put == "aao202" else 201)
        headers = self._lro_headers(req, res, op, location=False)
        return Response(status, self._render(res), headers), new_vm

    def _patch(self, req: Request, res: _Resource) -> Response:
        """PATCH merges and completes at once; it still names an (already finished) operation so
        callers that treat it as an LRO (`begin_update`) poll once and read the resource."""
        body = req.json()
        check_rest_shape(body)
        if "tags" in body:
            res.envelope["tags"] = body["tags"] or {}
        _merge(res.properties, body.get("properties") or {})
        op = self._operation(req, lambda: self._render(res), lambda: None, limit=lambda: 0)
        return Response(200, self._render(res), self._lro_headers(req, res, op, location=False))

    def _delete(self, req: Request, spec: _Type, rid: str) -> Response:
        res = self._store.get(rid.lower())
        if res is None:
            return Response(204)
        self._check_not_in_use(res)
        if spec.delete == "sync":
            del self._store[res.key]
            return Response(200)
        before = res.properties.get("provisioningState")
        res.properties["provisioningState"] = "Deleting"

        def succeed() -> None:
            self._remove(res)
            return None

        def fail() -> None:
            res.properties["provisioningState"] = before

        op = self._operation(req, succeed, fail)
        return Response(202, None, self._lro_headers(req, res, op))

    def _remove(self, res: _Resource) -> None:
        """Removes a resource with its children and what ARM deletes along with it."""
        for key in [k for k in self._store if k == res.key or k.startswith(res.key + "/")]:
            self._close_guest(self._store.pop(key))
        if res.type == "Microsoft.Compute/virtualMachines":
            # Parts created with deleteOption Delete go with the VM, as in ARM.
            os_disk = res.properties.get("storageProfile", {}).get("osDisk", {})
            doomed = [os_disk.get("managedDisk", {}).get("id")] if os_disk.get("deleteOption") == "Delete" else []
            doomed += [
                nic.get("id")
                for nic in res.properties.get("networkProfile", {}).get("networkInterfaces", [])
                if (nic.get("properties") or {}).get("deleteOption") == "Delete"
            ]
            for rid in doomed:
                if rid and rid.lower() in self._store:
                    self._store.pop(rid.lower())

    def _check_not_in_use(self, res: _Resource) -> None:
        rule = _IN_USE.get(res.type.lower())
        if rule is None:
            return
        status, code, user_types = rule
        users = [
            other.id
            for other in self._store.values()
            if other.type in user_types
            and any(ref == res.key or ref.startswith(res.key + "/") for ref in _references(other))
        ]
        if users:
            raise ArmError(
                status,
                code,
                f"{res.type.split('/')[-1]} {res.id} cannot be deleted because it is in use by the "
                f"following resources: {', '.join(users)}. In order to delete it, remove the association "
                "with the resource(s).",
            )

    def _list(self, sub: str, group: str | None, type_name: str | None, req: Request) -> Response:
        prefix = (f"/subscriptions/{sub}/" + (f"resourcegroups/{group}/" if group else "")).lower()
        filt = req.query.get("$filter", "")
        tag = re.search(r"tagname\s+eq\s+'([^']*)'(?:\s+and\s+tagvalue\s+eq\s+'([^']*)')?", filt, re.I)
        rtype = re.search(r"resourcetype\s+eq\s+'([^']*)'", filt, re.I)
        with self._lock:
            found = [
                self._render(r)
                for r in self._store.values()
                if r.key.startswith(prefix)
                and (type_name is None or r.type.lower() == type_name.lower())
                # Generic listings show top-level resources only, like ARM.
                and (type_name is not None or (r.type.count("/") == 1 and r.type != _GROUP_TYPE))
                and (rtype is None or r.type.lower() == rtype.group(1).lower())
            ]
        if tag is not None:
            found = [r for r in found if _tags_match(r.get("tags") or {}, {tag.group(1): tag.group(2)})]
        return Response(200, {"value": found})

    def _list_children(self, owner_id: str, child: _Type, req: Request) -> Response:
        prefix = owner_id.lower() + "/"
        with self._lock:
            found = [self._render(r) for r in self._store.values() if r.type == child.name and r.key.startswith(prefix)]
        return Response(200, {"value": found})

    # ----------------------------------------------------------------- long-running operations

    def _operation(
        self,
        req: Request,
        succeed: Callable[[], dict[str, Any] | None],
        fail: Callable[[], None],
        limit: Callable[[], int | None] | None = None,
    ) -> _Operation:
        polls = self.operation_polls
        op = _Operation(uuid.uuid4().hex, limit or (lambda: polls), succeed, fail)
        fault = self.faults.operation_fault(req.method, req.path)
        if fault is not None:
            op.limit = lambda: fault.polls
            op.http_status = fault.http_status
            if fault.code is not None:
                op.error = {"code": fault.code, "message": fault.message or f"Operation failed: {fault.code}."}
        with self._lock:
            self._ops[op.id] = op
        return op

    def _lro_headers(
        self, req: Request, res: _Resource, op: _Operation, *, aao: bool = True, location: bool = True
    ) -> dict[str, str]:
        sub = res.id.split("/")[2]
        ns = res.type.split("/")[0]
        region = self._region(res)
        base = f"{req.origin}/subscriptions/{sub}/providers/{ns}/locations/{region}"
        version = req.query["api-version"]
        headers = {"retry-after-ms": str(self.poll_ms)}
        if aao:
            headers["Azure-AsyncOperation"] = f"{base}/operations/{op.id}?api-version={version}"
        if location:
            headers["Location"] = f"{base}/operationResults/{op.id}?monitor=true&api-version={version}"
        return headers

    def _region(self, res: _Resource) -> str:
        location = res.envelope.get("location")
        if not location:
            group = self._store.get("/".join(res.key.split("/")[:5]))
            location = group.envelope.get("location") if group else "global"
        return region_name(str(location))

    def _poll(self, req: Request, op_id: str, *, via: str) -> Response:
        with self._lock:
            op = self._ops.get(op_id)
            if op is None:
                raise ArmError(404, "NotFound", f"Operation {op_id} not found.")
            self._advance(op)
            wait = {"retry-after-ms": str(self.poll_ms)}
            if via == "aao":
                body: dict[str, Any] = {"id": req.path, "name": op.id, "status": op.status, "startTime": op.started}
                if op.ended:
                    body["endTime"] = op.ended
                if op.error and op.status == "Failed":
                    body["error"] = op.error
                return Response(200, body, wait if op.status == "InProgress" else {})
            if op.status == "InProgress":
                return Response(202, None, {"Location": f"{req.origin}{req.path}?{_query(req)}", **wait})
            if op.status == "Failed":
                return error(op.http_status, op.error["code"], op.error["message"])
            return Response(200, op.result)

    def _advance(self, op: _Operation) -> None:
        """One poll: an InProgress answer, or the end with its effect applied."""
        if op.status != "InProgress":
            return
        op.polls += 1
        limit = op.limit()
        if limit is None or op.polls <= limit:
            return
        op.ended = now()
        if op.error is None:
            try:
                op.result = op.succeed()
                op.status = "Succeeded"
                return
            except ArmError as e:
                op.error = {"code": e.code, "message": e.message}
        op.status = "Failed"
        op.fail()

    # ----------------------------------------------------------------- actions

    def _action(self, req: Request, owner_id: str, spec: _Type, action: str) -> Response:
        handler = getattr(self, f"_act_{spec.name.split('/')[-1].lower()}_{action}", None)
        expected = "GET" if action == "instanceview" else "POST"
        if handler is None or req.method != expected:
            raise ArmError(
                404 if handler is None else 405,
                "NotFound" if handler is None else "MethodNotAllowed",
                f"No {req.method} action '{action}' on {spec.name}.",
            )
        with self._lock:
            _, _, sub, _, group = owner_id.split("/")[:5]
            self._require_group(sub, group)
            return handler(req, self._get(owner_id))

    def _async_action(
        self, req: Request, res: _Resource, succeed: Callable[[], dict[str, Any] | None], fail: Callable[[], None]
    ) -> Response:
        op = self._operation(req, succeed, fail)
        return Response(202, None, self._lro_headers(req, res, op))

    def _power_action(self, req: Request, vm: _Resource, during: str, after: str) -> Response:
        before = vm.state["power"]
        vm.state["power"] = during

        def succeed() -> None:
            vm.state["power"] = after
            return None

        def fail() -> None:
            vm.state["power"] = before

        return self._async_action(req, vm, succeed, fail)

    def _act_virtualmachines_start(self, req: Request, vm: _Resource) -> Response:
        if vm.state.get("generalized"):
            raise operation_not_allowed(
                f"Operation 'start' is not allowed on VM '{vm.name}' since the VM is generalized."
            )
        return self._power_action(req, vm, "starting", "running")

    def _act_virtualmachines_restart(self, req: Request, vm: _Resource) -> Response:
        self._require_power(vm, "restart", "running")
        return self._power_action(req, vm, "starting", "running")

    def _act_virtualmachines_poweroff(self, req: Request, vm: _Resource) -> Response:
        return self._power_action(req, vm, "stopping", "stopped")

    def _act_virtualmachines_deallocate(self, req: Request, vm: _Resource) -> Response:
        return self._power_action(req, vm, "deallocating", "deallocated")

    def _act_virtualmachines_generalize(self, req: Request, vm: _Resource) -> Response:
        self._require_power(vm, "generalize", "stopped", "deallocated")
        vm.state["generalized"] = True
        return Response(200)  # synchronous: the SDK accepts only 200 here

    def _act_virtualmachines_instanceview(self, req: Request, vm: _Resource) -> Response:
        return Response(200, self._instance_view(vm))

    def _act_virtualmachines_runcommand(self, req: Request, vm: _Resource) -> Response:
        self._require_power(vm, "runCommand", "running")
        body = req.json()
        check_rest_shape(body, envelope=False)

        def succeed() -> dict[str, Any]:
            stdout, stderr = self.run_command(vm.id, body)
            if body.get("commandId") == "RunPowerShellScript":
                return {
                    "value": [
                        {
                            "code": "ComponentStatus/StdOut/succeeded",
                            "level": "Info",
                            "displayStatus": "Provisioning succeeded",
                            "message": stdout,
                        },
                        {
                            "code": "ComponentStatus/StdErr/succeeded",
                            "level": "Info",
                            "displayStatus": "Provisioning succeeded",
                            "message": stderr,
                        },
                    ]
                }
            return {
                "value": [
                    {
                        "code": "ProvisioningState/succeeded",
                        "level": "Info",
                        "displayStatus": "Provisioning succeeded",
                        "message": f"Enable succeeded: \n[stdout]\n{stdout}\n[stderr]\n{stderr}",
                    }
                ]
            }

        return self._async_action(req, vm, succeed, lambda: None)

    def _act_virtualmachines_capture(self, req: Request, vm: _Resource) -> Response:
        if not vm.state.get("generalized"):
            raise operation_not_allowed(
                f"Capture operation cannot be completed because the VM '{vm.name}' is not generalized."
            )
        body = req.json()
        prefix = body.get("vhdPrefix", "vhd")
        container = body.get("destinationContainerName", "images")

        def succeed() -> dict[str, Any]:
            uri = f"https://emulated.blob.core.windows.net/system/Microsoft.Compute/Images/{container}/{prefix}-osDisk.{uuid.uuid4()}.vhd"
            return {
                "$schema": "http://schema.management.azure.com/schemas/2014-04-01-preview/VM_IP.json",
                "contentVersion": "1.0.0.0",
                "resources": [{"properties": {"storageProfile": {"osDisk": {"image": {"uri": uri}}}}}],
            }

        return self._async_action(req, vm, succeed, lambda: None)

    def _act_disks_begingetaccess(self, req: Request, disk: _Resource) -> Response:
        vm = self._attached_vm(disk)
        if vm is not None and vm.state.get("power") != "deallocated":
            raise operation_not_allowed(f"Disk '{disk.name}' is attached to VM '{vm.id}' that is not deallocated.")
        return self._grant(req, disk)

    def _act_snapshots_begingetaccess(self, req: Request, snap: _Resource) -> Response:
        return self._grant(req, snap)

    def _grant(self, req: Request, res: _Resource) -> Response:
        body = req.json()
        check_rest_shape(body, envelope=False)
        if body.get("access") not in ("Read", "Write", "None"):
            raise ArmError(400, "InvalidParameter", "The value of parameter access is invalid.")

        def succeed() -> dict[str, Any]:
            res.state["sas"] = self.blobs.publish(f"{res.name}-{res.key.split('/')[4]}.vhd", self.vhd)
            return {"accessSAS": res.state["sas"]}

        return self._async_action(req, res, succeed, lambda: None)

    def _act_disks_endgetaccess(self, req: Request, disk: _Resource) -> Response:
        return self._revoke(req, disk)

    def _act_snapshots_endgetaccess(self, req: Request, snap: _Resource) -> Response:
        return self._revoke(req, snap)

    def _revoke(self, req: Request, res: _Resource) -> Response:
        def succeed() -> None:
            if res.state.pop("sas", None):
                self.blobs.unpublish(f"{res.name}-{res.key.split('/')[4]}.vhd")
            return None

        return self._async_action(req, res, succeed, lambda: None)

    def _act_storageaccounts_listkeys(self, req: Request, account: _Resource) -> Response:
        _, key = self.blobs.account_endpoint(account.name)
        return Response(
            200,
            {
                "keys": [
                    {"keyName": "key1", "value": key, "permissions": "FULL"},
                    {"keyName": "key2", "value": key, "permissions": "FULL"},
                ]
            },
        )

    def _require_power(self, vm: _Resource, action: str, *allowed: str) -> None:
        if vm.state.get("power") not in allowed:
            raise operation_not_allowed(
                f"Operation '{action}' is not allowed on VM '{vm.name}' since the VM is "
                f"{vm.state.get('power')}; it must be {' or '.join(allowed)}."
            )

    # ----------------------------------------------------------------- per-type preparation

    def _prepare_storageAccounts(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        if not re.fullmatch(r"[a-z0-9]{3,24}", res.name):
            raise ArmError(
                400,
                "AccountNameInvalid",
                f"{res.name} is not a valid storage account name. Storage account name must be between 3 "
                "and 24 characters in length and use numbers and lower-case letters only.",
            )
        for other in self._store.values():
            if other.type == res.type and other.name == res.name and other.key != res.key:
                raise ArmError(
                    409, "StorageAccountAlreadyTaken", f"The storage account named {res.name} is already taken."
                )
        res.envelope.setdefault("kind", "StorageV2")
        res.envelope.setdefault("sku", {"name": "Standard_LRS", "tier": "Standard"})
        res.properties.setdefault("creationTime", existing.properties["creationTime"] if existing else now())

    def _prepare_virtualNetworks(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        # Inline subnets become child resources, which is how ARM stores them.
        for sub in res.properties.pop("subnets", None) or []:
            props = copy.deepcopy(sub.get("properties") or {})
            self._check_refs(props)
            props.setdefault("provisioningState", "Succeeded")
            sid = f"{res.id}/subnets/{sub['name']}"
            self._store[sid.lower()] = _Resource(sid, "Microsoft.Network/virtualNetworks/subnets", {}, props)
        guid = existing.properties["resourceGuid"] if existing else str(uuid.uuid4())
        res.properties.setdefault("resourceGuid", guid)

    def _prepare_virtualNetworks_subnets(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        self._check_refs(res.properties)

    def _prepare_networkSecurityGroups(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        for rule in res.properties.get("securityRules") or []:
            rule["id"] = f"{res.id}/securityRules/{rule.get('name')}"
        res.properties["defaultSecurityRules"] = [
            {
                "id": f"{res.id}/defaultSecurityRules/{name}",
                "name": name,
                "properties": {
                    "protocol": "*",
                    "access": access,
                    "direction": direction,
                    "priority": priority,
                    "sourceAddressPrefix": src,
                    "sourcePortRange": "*",
                    "destinationAddressPrefix": "*",
                    "destinationPortRange": "*",
                },
            }
            for name, access, direction, priority, src in (
                ("AllowVnetInBound", "Allow", "Inbound", 65000, "VirtualNetwork"),
                ("DenyAllInBound", "Deny", "Inbound", 65500, "*"),
                ("AllowInternetOutBound", "Allow", "Outbound", 65001, "*"),
            )
        ]

    def _prepare_publicIPAddresses(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        res.envelope.setdefault("sku", {"name": "Standard", "tier": "Regional"})
        res.properties.setdefault("publicIPAllocationMethod", "Static")
        res.properties.setdefault("publicIPAddressVersion", "IPv4")

    def _prepare_networkInterfaces(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        self._check_refs(res.properties)
        configs = res.properties.get("ipConfigurations") or []
        if not configs:
            raise ArmError(400, "InvalidRequestFormat", "A network interface needs at least one ipConfiguration.")
        for i, config in enumerate(configs):
            config["id"] = f"{res.id}/ipConfigurations/{config.get('name')}"
            props = config.setdefault("properties", {})
            props.setdefault("privateIPAllocationMethod", "Dynamic")
            props.setdefault("primary", i == 0)
        res.properties.setdefault(
            "macAddress",
            existing.properties.get("macAddress")
            if existing
            else "00-0D-3A-" + "-".join(f"{b:02X}" for b in uuid.uuid4().bytes[:3]),
        )

    def _prepare_virtualMachines(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        props = res.properties
        self._check_refs(props.get("networkProfile") or {})
        self._check_refs((props.get("storageProfile") or {}).get("imageReference") or {})
        if not (props.get("hardwareProfile") or {}).get("vmSize"):
            raise ArmError(400, "InvalidParameter", "Required parameter 'hardwareProfile.vmSize' is missing (null).")
        for nic in (props.get("networkProfile") or {}).get("networkInterfaces") or []:
            owner = self._attached_vm(self._store[nic["id"].lower()])
            if owner is not None and owner.key != res.key:
                raise ArmError(400, "NicInUse", f"Network interface {nic['id']} is used by existing VM {owner.id}.")
        os_profile = props.get("osProfile") or {}
        if existing is None:
            res.state["admin_password"] = os_profile.get("adminPassword")
        for secret in ("adminPassword", "customData"):  # write-only: ARM never returns them
            os_profile.pop(secret, None)
        storage = props.setdefault("storageProfile", {})
        image = storage.get("imageReference") or {}
        self._check_plan(res, image)
        windows = "windowsConfiguration" in os_profile or "windows" in str(image.get("offer", "")).lower()
        computer = os_profile.get("computerName")
        if computer and len(computer) > (15 if windows else 64):
            raise ArmError(
                400, "InvalidParameter", f"The value '{computer}' of parameter 'osProfile.computerName' is too long."
            )
        if existing is not None:
            props["vmId"] = existing.properties["vmId"]
            props["timeCreated"] = existing.properties["timeCreated"]
            storage["osDisk"] = existing.properties["storageProfile"]["osDisk"]
            return
        props["vmId"] = str(uuid.uuid4())
        props["timeCreated"] = now()
        os_disk = storage.setdefault("osDisk", {})
        os_disk.setdefault("osType", "Windows" if windows else "Linux")
        os_disk.setdefault("name", f"{res.name}_OsDisk_1_{uuid.uuid4().hex}")
        os_disk.setdefault("caching", "ReadWrite")
        os_disk.setdefault("createOption", "FromImage")
        os_disk.setdefault("deleteOption", "Detach")
        managed = os_disk.setdefault("managedDisk", {})
        if os_disk["createOption"] == "Attach":
            self._check_refs({"managedDisk": managed})
        else:
            disk_id = f"{'/'.join(res.id.split('/')[:5])}/providers/Microsoft.Compute/disks/{os_disk['name']}"
            managed["id"] = disk_id
            managed.setdefault("storageAccountType", "Standard_LRS")
            self._store[disk_id.lower()] = _Resource(
                disk_id,
                "Microsoft.Compute/disks",
                {"location": res.envelope["location"], "tags": {}, "sku": {"name": managed["storageAccountType"]}},
                {
                    "osType": os_disk["osType"],
                    "diskSizeGB": os_disk.get("diskSizeGB", 30),
                    "creationData": {"createOption": "FromImage", "imageReference": image},
                    "provisioningState": "Succeeded",
                    "timeCreated": now(),
                },
            )
        res.state.update(
            power="starting", generalized=False, os_type=os_disk["osType"], computer_name=computer or res.name
        )

    def _check_plan(self, vm: _Resource, image: dict[str, Any]) -> None:
        """A VM made from a marketplace image that has a purchase plan must name that plan."""
        entry = self._catalogue_entry(image.get("publisher", ""), image.get("offer", ""), image.get("sku", ""))
        if entry is None or entry.plan is None:
            return
        given = {k: str(v).lower() for k, v in (vm.envelope.get("plan") or {}).items()}
        if any(given.get(k) != str(v).lower() for k, v in entry.plan.items()):
            raise ArmError(
                400,
                "VMMarketplaceInvalidInput",
                "Creating a virtual machine from Marketplace image or a custom image sourced from a "
                "Marketplace image requires Plan information in the request. "
                f"VM: '{vm.id}'.",
            )

    def _ready_virtualMachines(self, res: _Resource) -> None:
        if "boot_error" in res.state:
            code, message = res.state.pop("boot_error")
            raise ArmError(400 if code == "OSProvisioningClientError" else 500, code, message)
        if res.state.get("power") == "starting":
            res.state["power"] = "running"

    def _prepare_virtualMachines_runCommands(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        vm = self._store[res.key.rsplit("/runcommands/", 1)[0]]
        self._require_power(vm, "runCommands", "running")
        res.state["vm_id"] = vm.id

    def _ready_virtualMachines_runCommands(self, res: _Resource) -> None:
        source = res.properties.get("source") or {}
        stdout, stderr = self.run_command(
            res.state["vm_id"],
            {
                "commandId": source.get("commandId", "RunShellScript"),
                "script": (source.get("script") or "").splitlines(),
                "parameters": res.properties.get("parameters") or [],
            },
        )
        res.state["instance_view"] = {
            "executionState": "Succeeded",
            "executionMessage": "",
            "exitCode": 0,
            "output": stdout,
            "error": stderr,
            "startTime": now(),
            "endTime": now(),
        }

    def _prepare_disks(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        creation = res.properties.get("creationData") or {}
        if not creation.get("createOption"):
            raise ArmError(400, "InvalidParameter", "Required parameter 'creationData.createOption' is missing.")
        source = self._check_refs(creation)
        if source and "diskSizeGB" not in res.properties:
            res.properties["diskSizeGB"] = source[0].properties.get("diskSizeGB")
        res.properties.setdefault("timeCreated", now())

    def _prepare_snapshots(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        creation = res.properties.get("creationData") or {}
        source = self._check_refs(creation)
        if not source:
            raise ArmError(400, "InvalidParameter", "A snapshot needs creationData.sourceResourceId or sourceUri.")
        self._check_copied(source)
        if str(creation.get("createOption", "")).lower() == "copystart":
            if source[0].type != "Microsoft.Compute/snapshots":
                raise ArmError(400, "InvalidParameter", "CopyStart copies a snapshot: sourceResourceId must be one.")
            if res.properties.get("incremental") is not True:
                raise ArmError(400, "InvalidParameter", "CopyStart is only supported for incremental snapshots.")
            if existing is None:
                res.state["copy_polls"] = 0
        res.properties.setdefault("diskSizeGB", source[0].properties.get("diskSizeGB"))
        res.properties.setdefault("osType", source[0].properties.get("osType"))
        res.properties.setdefault("timeCreated", now())

    def _prepare_images(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        sources = self._check_refs(res.properties)
        self._check_copied(sources)
        for source in sources:
            where = region_name(str(source.envelope.get("location", "")))
            if where != region_name(str(res.envelope["location"])):
                raise ArmError(
                    400,
                    "InvalidParameter",
                    f"The source {source.id} is in region '{where}', the image in "
                    f"'{region_name(str(res.envelope['location']))}': an image's source must be in its region.",
                )
        vm = next((s for s in sources if s.type == "Microsoft.Compute/virtualMachines"), None)
        if vm is not None:
            if not vm.state.get("generalized"):
                raise operation_not_allowed(
                    f"The source virtual machine '{vm.id}' must be generalized to create an image."
                )
            os_disk = vm.properties["storageProfile"]["osDisk"]
            res.properties["storageProfile"] = {
                "osDisk": {
                    "osType": os_disk["osType"],
                    "osState": "Generalized",
                    "caching": "ReadWrite",
                    "managedDisk": {"id": os_disk["managedDisk"]["id"]},
                    "storageAccountType": os_disk["managedDisk"].get("storageAccountType", "Standard_LRS"),
                    "diskSizeGB": 30,
                },
                "dataDisks": [],
                "zoneResilient": False,
            }
        elif not (res.properties.get("storageProfile") or {}).get("osDisk"):
            raise ArmError(400, "InvalidParameter", "An image needs sourceVirtualMachine or storageProfile.osDisk.")
        res.properties.setdefault("hyperVGeneration", "V1")

    def _prepare_galleries(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        res.properties["identifier"] = {"uniqueName": f"{res.id.split('/')[2]}-{res.name.upper()}"}

    def _prepare_galleries_images(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        for required in ("osType", "osState", "identifier"):
            if not res.properties.get(required):
                raise ArmError(400, "InvalidParameter", f"Required parameter '{required}' is missing (null).")

    def _prepare_galleries_images_versions(self, res: _Resource, existing: _Resource | None, req: Request) -> None:
        profile = res.properties.get("storageProfile") or {}
        if not self._check_refs(profile):
            raise ArmError(400, "InvalidParameter", "The gallery image version needs a source in storageProfile.")
        publishing = res.properties.setdefault("publishingProfile", {})
        publishing.setdefault("targetRegions", [{"name": res.envelope["location"], "regionalReplicaCount": 1}])
        publishing.setdefault("replicaCount", 1)
        publishing.setdefault("storageAccountType", "Standard_LRS")
        publishing["publishedDate"] = now()
        profile.setdefault("osDiskImage", {"sizeInGB": 30, "hostCaching": "ReadWrite"})

    def _replication_limit(self, res: _Resource) -> Callable[[], int | None]:
        """Records each target region's replication plan; the version's operation ends with the
        slowest region, and never while one of them is hung."""
        plans: dict[str, tuple[Callable[[], int | None], dict[str, str] | None]] = {}
        polls = self.operation_polls
        for region in res.properties["publishingProfile"]["targetRegions"]:
            fault = self.faults.replication_fault(region["name"])
            error = None
            if fault is not None and fault.fail_code:
                error = {
                    "code": fault.fail_code,
                    "message": fault.fail_message or f"Replication to region '{region['name']}' failed.",
                }
            need = (lambda f=fault: f.polls) if fault is not None else (lambda: polls)
            plans[region["name"]] = (need, error)
        res.state["replication"] = plans

        def limit() -> int | None:
            needs = [need() for need, _ in plans.values()]
            return None if None in needs else max(needs)

        return limit

    def _ready_galleries_images_versions(self, res: _Resource) -> None:
        failed = [e for _, e in res.state["replication"].values() if e]
        if failed:
            raise ArmError(409, failed[0]["code"], failed[0]["message"])

    def _copy_percent(self, res: _Resource) -> float | None:
        """A CopyStart snapshot's completionPercent, None for any other resource."""
        if "copy_polls" not in res.state:
            return None
        need = self.snapshot_copy_polls
        if need is not None and res.state["copy_polls"] > need:
            return 100.0
        return float(min(99, res.state["copy_polls"] * 100 // ((need or 0) + 1)))

    def _check_copied(self, sources: list[_Resource]) -> None:
        for source in sources:
            percent = self._copy_percent(source)
            if percent is not None and percent < 100:
                raise operation_not_allowed(
                    f"The copy of snapshot '{source.id}' is {percent:.0f}% complete; wait for it."
                )

    def _check_refs(self, props: dict[str, Any]) -> list[_Resource]:
        """Resolves every ARM id a request references; a dangling one fails as in ARM."""
        found = []
        for ref in _ids_in(props):
            target = self._store.get(ref.lower())
            if target is None:
                raise ArmError(
                    400, "InvalidResourceReference", f"Resource {ref} referenced by the request was not found."
                )
            found.append(target)
        return found

    # ----------------------------------------------------------------- rendering

    def _render(self, res: _Resource, expand: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": res.id, "name": res.name, "type": res.type, **copy.deepcopy(res.envelope)}
        props = copy.deepcopy(res.properties)
        if res.type.startswith("Microsoft.Network/"):
            out["etag"] = f'W/"{uuid.uuid5(uuid.NAMESPACE_URL, res.key + json.dumps(props, sort_keys=True))}"'
        kind = res.type.lower()
        if kind == "microsoft.network/virtualnetworks":
            props["subnets"] = [
                self._render(s) for s in self._store.values() if s.key.startswith(res.key + "/subnets/")
            ]
        elif kind == "microsoft.network/virtualnetworks/subnets":
            props["ipConfigurations"] = [
                {"id": c["id"]}
                for c in self._ip_configs()
                if (c["properties"].get("subnet") or {}).get("id", "").lower() == res.key
            ]
        elif kind == "microsoft.network/networksecuritygroups":
            for field_name, wanted in (("subnets", _SUBNETS), ("networkInterfaces", _NICS)):
                users = [
                    o.id
                    for o in self._store.values()
                    if o.type == wanted
                    and (o.properties.get("networkSecurityGroup") or {}).get("id", "").lower() == res.key
                ]
                if users:
                    props[field_name] = [{"id": u} for u in users]
        elif kind == "microsoft.network/networkinterfaces":
            vm = self._attached_vm(res)
            host = self._guest_host(vm)
            if vm is not None:
                props["virtualMachine"] = {"id": vm.id}
            for config in props.get("ipConfigurations") or []:
                config["properties"]["privateIPAddress"] = host
                config["properties"]["provisioningState"] = props["provisioningState"]
        elif kind == "microsoft.network/publicipaddresses":
            config = next(
                (
                    c
                    for c in self._ip_configs()
                    if (c["properties"].get("publicIPAddress") or {}).get("id", "").lower() == res.key
                ),
                None,
            )
            if config is not None:
                props["ipConfiguration"] = {"id": config["id"]}
                nic = self._store.get(config["id"].lower().rsplit("/ipconfigurations/", 1)[0])
                props["ipAddress"] = self._guest_host(self._attached_vm(nic) if nic else None)
            else:
                props["ipAddress"] = "127.0.0.1"
        elif kind == "microsoft.compute/virtualmachines" and (expand or "").lower() == "instanceview":
            props["instanceView"] = self._instance_view(res)
        elif kind == "microsoft.compute/virtualmachines/runcommands" and (expand or "").lower() == "instanceview":
            props["instanceView"] = res.state.get("instance_view") or {"executionState": "Running"}
        elif kind == "microsoft.compute/disks":
            vm = self._attached_vm(res)
            if vm is not None:
                out["managedBy"] = vm.id
            props["diskState"] = (
                "ActiveSAS"
                if res.state.get("sas")
                else "Unattached"
                if vm is None
                else "Reserved"
                if vm.state.get("power") == "deallocated"
                else "Attached"
            )
        elif kind == "microsoft.compute/snapshots" and "copy_polls" in res.state:
            props["completionPercent"] = self._copy_percent(res)
        elif kind == "microsoft.compute/galleries/images/versions" and (expand or "").lower() == "replicationstatus":
            props["replicationStatus"] = self._replication_status(res)
        elif kind == "microsoft.storage/storageaccounts":
            props["primaryEndpoints"] = {"blob": self._blob_endpoint(res.name)}
            props["primaryLocation"] = res.envelope.get("location")
            props["statusOfPrimary"] = "available"
        out["properties"] = props
        return out

    def _instance_view(self, vm: _Resource) -> dict[str, Any]:
        state = vm.properties["provisioningState"].lower()
        statuses = [
            {
                "code": f"ProvisioningState/{state}",
                "level": "Info" if state != "failed" else "Error",
                "displayStatus": f"Provisioning {state}",
                "time": vm.properties["timeCreated"],
            },
            {"code": f"PowerState/{vm.state['power']}", "level": "Info", "displayStatus": f"VM {vm.state['power']}"},
        ]
        if vm.state.get("generalized"):
            statuses.append({"code": "OSState/generalized", "level": "Info", "displayStatus": "VM generalized"})
        os_disk = vm.properties["storageProfile"]["osDisk"]
        return {
            "computerName": vm.state["computer_name"],
            "osName": vm.state["os_type"].lower(),
            "vmAgent": {
                "vmAgentVersion": "2.9.1.1",
                "statuses": [
                    {
                        "code": "ProvisioningState/succeeded",
                        "level": "Info",
                        "displayStatus": "Ready",
                        "message": "GuestAgent is running and accepting new configurations.",
                    }
                ],
            },
            "disks": [
                {
                    "name": os_disk["name"],
                    "statuses": [
                        {
                            "code": "ProvisioningState/succeeded",
                            "level": "Info",
                            "displayStatus": "Provisioning succeeded",
                        }
                    ],
                }
            ],
            "statuses": statuses,
        }

    def _replication_status(self, res: _Resource) -> dict[str, Any]:
        op: _Operation = res.state["operation"]
        summary = []
        for region, (need_of, failure) in res.state["replication"].items():
            need = need_of()
            done = op.status != "InProgress" or (need is not None and op.polls > need)
            progress = min(99, op.polls * 100 // (need + 1) if need is not None else op.polls)
            if done and failure:
                summary.append(
                    {"region": region, "state": "Failed", "details": failure["message"], "progress": progress}
                )
            elif done:
                summary.append({"region": region, "state": "Completed", "details": "", "progress": 100})
            else:
                summary.append({"region": region, "state": "Replicating", "details": "", "progress": progress})
        states = {s["state"] for s in summary}
        aggregated = "Failed" if "Failed" in states else "Completed" if states == {"Completed"} else "InProgress"
        return {"aggregatedState": aggregated, "summary": summary}

    def _ip_configs(self) -> list[dict[str, Any]]:
        return [
            c
            for r in self._store.values()
            if r.type == "Microsoft.Network/networkInterfaces"
            for c in r.properties.get("ipConfigurations") or []
        ]

    def _blob_endpoint(self, account: str) -> str:
        if self._blob_proxy is not None:
            return self._blob_proxy.endpoint(self.base_url)
        blob, _ = self.blobs.account_endpoint(account)
        return blob

    def _attached_vm(self, res: _Resource) -> _Resource | None:
        for vm in self._store.values():
            if vm.type == "Microsoft.Compute/virtualMachines" and res.key in _references(vm):
                return vm
        return None

    # ----------------------------------------------------------------- guests

    def _boot_guest(self, vm: _Resource) -> None:
        if self.guest_factory is None:
            return
        os_profile = vm.properties.get("osProfile") or {}
        keys = ((os_profile.get("linuxConfiguration") or {}).get("ssh") or {}).get("publicKeys") or []
        spec = GuestSpec(
            vm_id=vm.id,
            name=vm.name,
            computer_name=os_profile.get("computerName"),
            os_type=vm.state["os_type"],
            admin_username=os_profile.get("adminUsername"),
            admin_password=vm.state.pop("admin_password", None),
            ssh_public_keys=tuple(k.get("keyData", "") for k in keys),
            image_reference=vm.properties["storageProfile"].get("imageReference") or {},
        )
        try:
            endpoint = self.guest_factory(spec)
        except Exception as e:  # the VM's creation fails through its operation, as a boot failure does
            # A guest that can never start (non_retryable) is the image's fault, as Azure's client error says.
            code = "OSProvisioningClientError" if getattr(e, "non_retryable", False) else "OSProvisioningInternalError"
            with self._lock:
                vm.state["boot_error"] = (code, f"The guest of VM '{vm.name}' failed to start: {e!r}")
            return
        with self._lock:
            vm.state["guest"] = endpoint

    def _guest_host(self, vm: _Resource | None) -> str:
        guest = vm.state.get("guest") if vm is not None else None
        return guest.host if guest is not None else "127.0.0.1"

    def _close_guest(self, res: _Resource) -> None:
        guest = res.state.pop("guest", None)
        if guest is not None and guest.close is not None:
            guest.close()


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


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def _image_version(
    image: PlatformImage, base: str, region: str, version: str, *, with_properties: bool
) -> dict[str, Any]:
    """A VirtualMachineImage: the list shows name, location and id; get adds its properties."""
    out: dict[str, Any] = {"location": region, "name": version, "id": f"{base}/{version}"}
    if with_properties:
        out["properties"] = {
            "osDiskImage": {"operatingSystem": image.os_type},
            "dataDiskImages": [],
            "automaticOSUpgradeProperties": {"automaticOSUpgradeSupported": False},
            "hyperVGeneration": image.hyper_v_generation,
            "architecture": image.architecture,
            "imageDeprecationStatus": {"imageState": "Active"},
            **({"plan": dict(image.plan)} if image.plan else {}),
        }
    return out


def _group_not_found(name: str) -> ArmError:
    return ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")


def _group_being_deleted(name: str) -> ArmError:
    return ArmError(
        409,
        "ResourceGroupBeingDeleted",
        f"The resource group '{name}' is in deprovisioning state and cannot perform this operation.",
    )


def _query(req: Request) -> str:
    return "&".join(f"{k}={v}" for k, v in req.query.items())


def _ids_in(value: Any) -> list[str]:
    """Every ARM id referenced in a body (values of keys named id or ending in Id)."""
    if isinstance(value, list):
        return [i for v in value for i in _ids_in(v)]
    if not isinstance(value, dict):
        return []
    found = []
    for k, v in value.items():
        if (k == "id" or k.endswith("Id")) and isinstance(v, str) and v.lower().startswith("/subscriptions/"):
            found.append(v)
        else:
            found += _ids_in(v)
    return found


def _references(res: _Resource) -> set[str]:
    """Lower-cased ids a resource points at, outside its own subtree."""
    return {i.lower() for i in _ids_in(res.properties) if not i.lower().startswith(res.key)}


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _tags_match(tags: dict[str, str], wanted: dict[str, str | None]) -> bool:
    lowered = {k.lower(): v for k, v in tags.items()}
    return all(k.lower() in lowered and (v is None or lowered[k.lower()] == v) for k, v in wanted.items())
