"""Fault injection for the ARM emulator.

Two kinds of fault exist because ARM fails in two places. A *request* fault answers the HTTP call
itself (429 with Retry-After, 500, 409, a slow or dropped response) and is what azure-core's
RetryPolicy sees. An *operation* fault lets the call be accepted and makes the long-running
operation behind it misbehave (end Failed with an error code, stay InProgress for N polls or for
ever, replicate a gallery image version slowly or fail in one region); that is what an LRO poller
and kiln's own error handling see. Both match on HTTP method and a regex searched in the URL path,
and both can be limited to a number of matches (`times`) after skipping the first `after` matches,
which is how a test fails "the third PUT of a VM" and nothing else.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from .protocol import region_name


@dataclass
class _Match:
    method: str | None
    path_regex: str | None
    times: int | None
    after: int
    seen: int = 0
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        """Counts a matching request and says whether this one is to be faulted."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.path_regex is not None and not re.search(self.path_regex, path, re.IGNORECASE):
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


@dataclass
class RequestFault:
    """How one faulted request is answered.

    `status=None` with a `delay` makes a slow but otherwise normal answer; `drop=True` closes the
    connection without any answer (azure-core retries that for idempotent methods only). `answer_delay`
    serves the request at once (it takes effect) and holds only the answer: a caller killed meanwhile
    never learns what it did.
    """

    match: _Match
    status: int | None
    code: str | None
    message: str | None
    retry_after: int | None
    delay: float
    drop: bool
    answer_delay: float = 0.0

    @property
    def hits(self) -> int:
        return self.match.hits


@dataclass
class OperationFault:
    """How a faulted long-running operation behaves.

    `code` set: the operation ends Failed with that ARM error code (the poller raises
    HttpResponseError carrying it). `polls`: how many polls answer InProgress before the end;
    None means never, a hung operation. `http_status` is only used where the outcome is read from a
    Location URL rather than an operation-status body (resource group delete, storage account
    create), since there the HTTP status is the outcome.
    """

    match: _Match
    code: str | None = None
    message: str | None = None
    polls: int | None = 0
    http_status: int = 409

    @property
    def hits(self) -> int:
        return self.match.hits


@dataclass
class ReplicationFault:
    """Slow or failing replication of gallery image versions to the matched regions."""

    regions: set[str] | None
    polls: int | None  # None: replication hangs until a test sets a number
    fail_code: str | None
    fail_message: str | None

    def covers(self, region: str) -> bool:
        return self.regions is None or region_name(region) in self.regions


@dataclass
class Faults:
    """The fault plan of one emulator; thread-safe, changeable while the emulator runs."""

    _request: list[RequestFault] = field(default_factory=list)
    _operation: list[OperationFault] = field(default_factory=list)
    _replication: list[ReplicationFault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self,
        *,
        method: str | None = None,
        path_regex: str | None = None,
        status: int | None = 500,
        code: str | None = None,
        message: str | None = None,
        retry_after: int | None = None,
        times: int | None = 1,
        after: int = 0,
        delay: float = 0.0,
        drop: bool = False,
        answer_delay: float = 0.0,
    ) -> RequestFault:
        """Answers matching requests with `status` and an ARM error body instead of serving them.

        `retry_after` adds an integer Retry-After header, which makes azure-core retry any status
        >= 400 for any method and sleep exactly that long; leave it None to test the SDK's own
        retry set. `times=None` faults every match.
        """
        fault = RequestFault(
            _Match(method, path_regex, times, after), status, code, message, retry_after, delay, drop, answer_delay
        )
        with self._lock:
            self._request.append(fault)
        return fault

    def fail_operation(
        self,
        *,
        method: str | None = None,
        path_regex: str | None = None,
        code: str = "InternalOperationError",
        message: str | None = None,
        polls: int = 0,
        http_status: int = 409,
        times: int | None = 1,
        after: int = 0,
    ) -> OperationFault:
        """Accepts the matching call, then ends its operation Failed with `code` after `polls` polls."""
        fault = OperationFault(_Match(method, path_regex, times, after), code, message, polls, http_status)
        with self._lock:
            self._operation.append(fault)
        return fault

    def slow_operation(
        self,
        *,
        method: str | None = None,
        path_regex: str | None = None,
        polls: int | None = None,
        times: int | None = 1,
        after: int = 0,
    ) -> OperationFault:
        """Keeps the matching operation InProgress for `polls` polls; None hangs it.

        The operation reads the returned fault's `polls` at every poll, so a test can release a
        hang (`fault.polls = 0`) once it has looked at the in-between state.
        """
        fault = OperationFault(_Match(method, path_regex, times, after), polls=polls)
        with self._lock:
            self._operation.append(fault)
        return fault

    def slow_replication(
        self,
        *,
        polls: int | None,
        regions: list[str] | None = None,
        fail_code: str | None = None,
        fail_message: str | None = None,
    ) -> ReplicationFault:
        """Makes gallery image versions need `polls` polls per region (all regions if None).

        `polls=None` hangs those regions; setting the returned fault's `polls` later releases them,
        which is how a test observes a half-replicated version deterministically.

        With `fail_code`, the matched regions end in state Failed, the aggregated state is Failed
        and the version's operation fails with that code, as a regional replication failure does.
        """
        fault = ReplicationFault(
            None if regions is None else {region_name(r) for r in regions}, polls, fail_code, fail_message
        )
        with self._lock:
            self._replication.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._request.clear()
            self._operation.clear()
            self._replication.clear()

    def request_fault(self, method: str, path: str) -> RequestFault | None:
        with self._lock:
            return next((f for f in self._request if f.match.take(method, path)), None)

    def operation_fault(self, method: str, path: str) -> OperationFault | None:
        with self._lock:
            return next((f for f in self._operation if f.match.take(method, path)), None)

    def replication_fault(self, region: str) -> ReplicationFault | None:
        with self._lock:
            # The newest matching plan wins, so a test can override an earlier one.
            return next((f for f in reversed(self._replication) if f.covers(region)), None)
