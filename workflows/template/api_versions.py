"""AIB's API versions, and what a template's `apiVersion` changes about how AIB reads it.

Three things depend on the version (aib.md §1.2, read from AIB's published API specifications):

- Strictness. From 2024-02-01 AIB refuses unknown fields and matches field names case-sensitively. Earlier
  versions read a body as Go's JSON decoder does: a field name in any case finds its field, and an unknown
  field is dropped. kiln does the same for those versions, and says so in a warning.
- Fields. A field added in a later version is, to an earlier one, an unknown field: `Since` marks such fields.
- Requirements. `replicationRegions` is required before 2022-07-01: `RequiredBefore` marks such fields.

A template without `apiVersion` is read as the newest version, as kiln's models describe it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Every version of Microsoft.VirtualMachineImages/imageTemplates ARM has published, oldest first.
AIB_API_VERSIONS = (
    "2018-02-01-preview",
    "2019-02-01-preview",
    "2019-05-01-preview",
    "2020-02-14",
    "2021-10-01",
    "2022-02-14",
    "2022-07-01",
    "2023-07-01",
    "2024-02-01",
    "2025-10-01",
)
NEWEST = AIB_API_VERSIONS[-1]
# From this version on, unknown fields are refused and field names are case-sensitive.
STRICT_FROM = "2024-02-01"
# From this version on, a template must name the identity AIB acts as.
IDENTITY_REQUIRED_FROM = "2020-02-14"


def _key(version: str) -> tuple[str, bool]:
    # A preview comes before the release of the same date.
    return version[:10], not version.endswith("-preview")


def is_before(version: str, other: str) -> bool:
    """Whether API `version` is older than `other`."""
    return _key(version) < _key(other)


def is_strict(version: str) -> bool:
    """Whether AIB refuses unknown fields and field names in the wrong case at API `version`."""
    return not is_before(version, STRICT_FROM)


def api_version_of(body: object) -> str:
    """The API version a template body is read at: its `apiVersion` when that is one AIB has, else the newest
    (a version AIB does not have is refused by the `apiVersion` field itself)."""
    version = body.get("apiVersion") if isinstance(body, dict) else None
    return version if version in AIB_API_VERSIONS else NEWEST


@dataclass(frozen=True)
class ApiContext:
    """What template models are validated with (pydantic's validation context): the API version."""

    api_version: str = NEWEST


@dataclass(frozen=True)
class Since:
    """Marks a field that AIB's API has only from `version` on (`Annotated[X, Since("2024-02-01")]`)."""

    version: str


@dataclass(frozen=True)
class RequiredBefore:
    """Marks a field that AIB's API requires before `version` and makes optional from it on."""

    version: str


def marker(metadata: list[Any], kind: type[Since] | type[RequiredBefore]) -> str | None:
    """The version of a field's `Since` or `RequiredBefore` marker, if it has one."""
    return next((m.version for m in metadata if isinstance(m, kind)), None)


def version_note(metadata: list[Any]) -> str:
    """What a field's markers say, as its JSON schema description ends ("" without markers)."""
    since, required_before = marker(metadata, Since), marker(metadata, RequiredBefore)
    notes = [
        f"From API version {since}." if since else "",
        f"Required before API version {required_before}." if required_before else "",
    ]
    return " ".join(note for note in notes if note)
