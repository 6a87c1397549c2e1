"""Long-running operations: starting one (operation faults applied), the Azure-AsyncOperation and Location URLs
that name it, and the answers to polling them.

An operation answers InProgress for `operation_polls` polls and then ends, applying its effect; faults change
that (see faults.py). Its status body answers 200 with the status; its Location URL answers 202 while it runs and
200 with the result afterwards, for ever, because the legacy SDK GETs it once more. Every answer carries
`retry-after-ms`, which the SDK honours over its 30 s default polling interval, so tests run fast without
touching client settings. Operations are kept by id in `ArmEmulator.operations` for the emulator's lifetime.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .protocol import ArmError, Request, Response, error, now
from .provider import Route
from .store import Resource

if TYPE_CHECKING:
    from .server import ArmEmulator


@dataclass
class Operation:
    """One long-running operation: how long it runs, what its end does, and how it ended."""

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

    def advance(self) -> None:
        """One poll: an InProgress answer, or the end with its effect applied.

        ARM's work goes on whether or not its operation is polled, so a GET of the resource advances it too.
        """
        if self.status != "InProgress":
            return
        self.polls += 1
        limit = self.limit()
        if limit is None or self.polls <= limit:
            return
        self.ended = now()
        if self.error is None:
            try:
                self.result = self.succeed()
                self.status = "Succeeded"
                return
            except ArmError as e:
                self.error = {"code": e.code, "message": e.message}
        self.status = "Failed"
        self.fail()


def _nothing() -> None:
    return None


def start_operation(
    arm: ArmEmulator,
    req: Request,
    succeed: Callable[[], dict[str, Any] | None],
    fail: Callable[[], None] = _nothing,
    limit: Callable[[], int | None] | None = None,
) -> Operation:
    """Registers the operation behind `req`: `succeed` applies its effect (raising ArmError fails it instead),
    `fail` undoes what the request did at once. An operation fault matching `req` replaces `limit` and outcome."""
    polls = arm.operation_polls
    op = Operation(uuid.uuid4().hex, limit or (lambda: polls), succeed, fail)
    fault = arm.faults.operation_fault(req.method, req.path)
    if fault is not None:
        op.limit = lambda: fault.polls
        op.http_status = fault.http_status
        if fault.code is not None:
            op.error = {"code": fault.code, "message": fault.message or f"Operation failed: {fault.code}."}
    with arm.lock:
        arm.operations[op.id] = op
    return op


def lro_headers(
    arm: ArmEmulator, req: Request, res: Resource, op: Operation, *, aao: bool = True, location: bool = True
) -> dict[str, str]:
    """The headers naming `op`, under the resource's provider and region as ARM mints them."""
    sub = res.id.split("/")[2]
    ns = res.type.split("/")[0]
    base = f"{req.origin}/subscriptions/{sub}/providers/{ns}/locations/{arm.store.region(res)}"
    version = req.query["api-version"]
    headers = {"retry-after-ms": str(arm.poll_ms)}
    if aao:
        headers["Azure-AsyncOperation"] = f"{base}/operations/{op.id}?api-version={version}"
    if location:
        headers["Location"] = f"{base}/operationResults/{op.id}?monitor=true&api-version={version}"
    return headers


def subscription_lro_headers(arm: ArmEmulator, req: Request, sub: str, op: Operation) -> dict[str, str]:
    """A Location under the subscription itself, as Microsoft.Resources names its operations."""
    location = f"{req.origin}/subscriptions/{sub}/operationresults/{op.id}?api-version={req.query['api-version']}"
    return {"Location": location, "retry-after-ms": str(arm.poll_ms)}


def accept_action(
    arm: ArmEmulator,
    req: Request,
    res: Resource,
    succeed: Callable[[], dict[str, Any] | None],
    fail: Callable[[], None] = _nothing,
) -> Response:
    """A POST action's answer: 202 with both Azure-AsyncOperation and Location."""
    op = start_operation(arm, req, succeed, fail)
    return Response(202, None, lro_headers(arm, req, res, op))


def _polled(arm: ArmEmulator, op_id: str) -> Operation:
    op = arm.operations.get(op_id)
    if op is None:
        raise ArmError(404, "NotFound", f"Operation {op_id} not found.")
    op.advance()
    return op


def _status_answer(arm: ArmEmulator, req: Request, sub: str, op_id: str) -> Response:
    """Azure-AsyncOperation: always 200, the outcome in the body."""
    with arm.lock:
        op = _polled(arm, op_id)
        body: dict[str, Any] = {"id": req.path, "name": op.id, "status": op.status, "startTime": op.started}
        if op.ended:
            body["endTime"] = op.ended
        if op.error and op.status == "Failed":
            body["error"] = op.error
        return Response(200, body, {"retry-after-ms": str(arm.poll_ms)} if op.status == "InProgress" else {})


def _location_answer(arm: ArmEmulator, req: Request, sub: str, op_id: str) -> Response:
    """Location: 202 while running, then the outcome as the HTTP status (the result body on success)."""
    with arm.lock:
        op = _polled(arm, op_id)
        if op.status == "InProgress":
            query = "&".join(f"{k}={v}" for k, v in req.query.items())
            return Response(
                202, None, {"Location": f"{req.origin}{req.path}?{query}", "retry-after-ms": str(arm.poll_ms)}
            )
        if op.status == "Failed":
            return error(op.http_status, op.error["code"], op.error["message"])
        return Response(200, op.result)


# The URLs minted above; the SDK GETs them verbatim (api-version inside), so they are served before the
# api-version check.
ROUTES = (
    Route("operationresults/([^/]+)", _location_answer),
    Route("providers/[^/]+/locations/[^/]+/operations/([^/]+)", _status_answer),
    Route("providers/[^/]+/locations/[^/]+/operationresults/([^/]+)", _location_answer),
)
