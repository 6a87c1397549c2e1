"""Storage accounts' blob traffic passed through the emulator on to Azurite (`proxy_storage`).

With it, storage accounts' blob endpoints point at the emulator itself, which passes every blob request on to
Azurite unchanged (the signed path is the same) and so applies request faults to blob traffic too; those are
answered as the blob service answers errors (XML body, `x-ms-error-code`). A server-side blob copy (Put Blob with
`x-ms-copy-source`) reports `x-ms-copy-status: pending` for `blob_copy_polls` reads of the destination, since
Azurite itself finishes copies at once; None keeps the copy pending until a test sets a number, and `hold_copies`
keeps the copies to some destinations pending until released.

A copy still pending when its source's SAS is revoked (a disk export's endGetAccess, see `revoke`) fails, as the
blob service fails a copy whose source it can no longer read.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .blobs import Azurite
from .protocol import Request, Response


@dataclass
class _BlobCopy:
    id: str
    source: str  # the source's path, without its SAS
    polls: int = 0
    done: bool = False  # reported finished: a revocation after that no longer matters
    failed: bool = False


class BlobProxy:
    """Passes blob requests under Azurite's account path on to Azurite, pacing the copies they start."""

    def __init__(self, azurite: Azurite) -> None:
        self._azurite = azurite
        self._copies: dict[str, _BlobCopy] = {}  # by destination path
        self._held: set[str] = set()  # destination path patterns whose copies stay pending
        self._lock = threading.Lock()

    def _prefix(self) -> str:
        return "/" + urlsplit(self._azurite.blob_url).path.strip("/")

    def covers(self, path: str) -> bool:
        """Whether a request path is blob traffic rather than ARM's."""
        prefix = self._prefix()
        return path == prefix or path.startswith(prefix + "/")

    def endpoint(self, base_url: str) -> str:
        """The blob endpoint storage accounts report: the emulator at `base_url`, under Azurite's path."""
        return f"{base_url}{self._prefix()}/"

    def hold_copies(self, path_regex: str) -> Callable[[], None]:
        """Keep copies to destinations matching `path_regex` pending; returns what releases them."""
        with self._lock:
            self._held.add(path_regex)

        def release() -> None:
            with self._lock:
                self._held.discard(path_regex)

        return release

    def revoke(self, source_url: str) -> None:
        """The SAS of `source_url` is revoked: the copies from it that are still pending fail."""
        source = urlsplit(source_url).path
        with self._lock:
            for copy in self._copies.values():
                if copy.source == source and not copy.done:
                    copy.failed = True

    def serve(self, req: Request, copy_polls: int | None) -> Response:
        """Azurite's answer to `req`, a copy it started still pending for `copy_polls` reads (None: until told)."""
        return self._pace_copy(req, self._pass_on(req), copy_polls)

    def _pass_on(self, req: Request) -> Response:
        target = urlsplit(self._azurite.blob_url)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "connection")}
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        try:
            path = f"{req.path}?{req.raw_query}" if req.raw_query else req.path
            connection.request(req.method, path, body=req.body, headers=headers)
            answer = connection.getresponse()
            body = answer.read()
            hop = ("connection", "transfer-encoding", "keep-alive")
            kept = {k: v for k, v in answer.getheaders() if k.lower() not in hop}
            if answer.getheader("Transfer-Encoding") and not answer.getheader("Content-Length"):
                kept["Content-Length"] = str(len(body))
            return Response(answer.status, body, kept, raw=True)
        finally:
            connection.close()

    def _pace_copy(self, req: Request, resp: Response, copy_polls: int | None) -> Response:
        """Azurite finishes a copy before answering; this makes it report pending for `copy_polls` reads
        of the destination first (or while held), as a copy of a large blob does, and failed once its source's
        SAS was revoked meanwhile."""
        header = {k.lower(): k for k in resp.headers}
        copy_id = resp.headers.get(header.get("x-ms-copy-id", ""))
        source = next((v for k, v in req.headers.items() if k.lower() == "x-ms-copy-source"), None)
        with self._lock:
            held = any(re.search(pattern, req.path) for pattern in self._held)
            if req.method == "PUT" and source and copy_id and (copy_polls != 0 or held):
                self._copies[req.path] = copy = _BlobCopy(copy_id, urlsplit(source).path)
            elif req.method in ("GET", "HEAD") and not req.raw_query and req.path in self._copies:
                copy = self._copies[req.path]
                copy.polls += 1
            else:
                return resp
            if copy_id != copy.id:
                return resp
            if copy.failed:
                state = "failed"
            elif held or copy_polls is None or copy.polls <= copy_polls:
                state = "pending"
            else:
                copy.done = True
                return resp
        resp.headers[header.get("x-ms-copy-status", "x-ms-copy-status")] = state
        if state == "failed":
            resp.headers["x-ms-copy-status-description"] = (
                "403 CannotVerifyCopySource: the copy source's access signature was revoked"
            )
        for name in ("x-ms-copy-completion-time", "x-ms-copy-progress"):
            resp.headers.pop(header.get(name, name), None)
        return resp
