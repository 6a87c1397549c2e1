"""ARM's wire vocabulary: a request, an answer, the call log's record of both, the error envelope, and the checks
every request body gets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple


class Call(NamedTuple):
    """One HTTP exchange; status 0 means the connection was dropped without an answer.

    `at` (epoch seconds, when the request was read) and `seconds` (until the answer was ready,
    injected delays and a VM's guest boot included) say how long the emulated ARM itself took.
    """

    method: str
    path: str
    status: int
    at: float = 0.0
    seconds: float = 0.0


class ArmError(Exception):
    """An ARM error answer: HTTP status plus the `{"error": {"code", "message"}}` body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class Request:
    """One request as the emulator reads it; `query` has lower-cased names, `raw_query` is as sent."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes
    origin: str  # scheme://host:port as the client addressed us, for absolute URLs
    range: str | None = None  # Range / x-ms-range, only read for served blobs
    authorization: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # all of them, for requests passed on to Azurite
    raw_query: str = ""

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; anything else is ARM's 400 InvalidRequestContent."""
        try:
            value = json.loads(self.body or b"{}")
        except ValueError as e:
            raise ArmError(400, "InvalidRequestContent", f"The request content was invalid: {e}") from e
        if not isinstance(value, dict):
            raise ArmError(400, "InvalidRequestContent", "The request content must be a JSON object.")
        return value


@dataclass
class Response:
    """One answer: a dict or list goes out as JSON, bytes as they are."""

    status: int
    body: dict[str, Any] | list[Any] | bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bool = False  # Azurite's own answer: its headers go out as they are


def error(status: int, code: str, message: str) -> Response:
    """ARM's error envelope."""
    return Response(status, {"error": {"code": code, "message": message}})


def storage_error(status: int, code: str, message: str) -> Response:
    """An error as the blob service answers it: XML body, the code in a header too."""
    body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return Response(status, body.encode(), {"Content-Type": "application/xml", "x-ms-error-code": code})


def method_not_allowed(req: Request) -> ArmError:
    """ARM's 405 for a method a path does not serve."""
    return ArmError(405, "MethodNotAllowed", f"The requested method {req.method} is not allowed on {req.path}.")


def operation_not_allowed(message: str) -> ArmError:
    """What ARM answers an operation the resource's current state forbids (a running VM's generalize)."""
    return ArmError(409, "OperationNotAllowed", message)


# The members a resource body may have besides `properties`; PUT keeps them as the resource's envelope.
ENVELOPE = ("location", "tags", "sku", "kind", "identity", "zones", "plan", "extendedLocation", "managedBy")
_ALLOWED_TOP = {*ENVELOPE, "properties", "id", "name", "type", "etag"}


def check_rest_shape(body: dict[str, Any], *, envelope: bool = True) -> None:
    """Refuses bodies that are not ARM REST JSON (camelCase; for resources, fields nested under
    `properties`). Action bodies (runCommand, beginGetAccess) have no envelope.

    Stricter than ARM on purpose: the current SDKs send a dict verbatim, and real Azure would silently
    ignore snake_case keys, so a body with them is refused here rather than building the wrong resource.
    """
    unknown = set(body) - _ALLOWED_TOP if envelope else set()
    if unknown:
        raise ArmError(
            400,
            "InvalidRequestContent",
            f"The request content was invalid: unknown top-level member(s) {sorted(unknown)}; "
            "resource fields belong under 'properties' in camelCase.",
        )
    bad = _snake_keys(body)
    if bad:
        raise ArmError(
            400,
            "InvalidRequestContent",
            f"The request content was invalid: member(s) {sorted(bad)} are not camelCase REST names.",
        )


def _snake_keys(value: Any, under: str = "") -> set[str]:
    if isinstance(value, list):
        return set().union(*(_snake_keys(v, under) for v in value)) if value else set()
    if not isinstance(value, dict) or under in ("tags", "userAssignedIdentities"):
        return set()  # user-chosen keys
    found = {k for k in value if "_" in k}
    for k, v in value.items():
        found |= _snake_keys(v, k)
    return found


def now() -> str:
    """A timestamp as ARM writes them (UTC, ending in Z)."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def region_name(location: str) -> str:
    """A location as ARM writes it in ids: "East US" and "eastus" are the same region."""
    return location.replace(" ", "").lower()
