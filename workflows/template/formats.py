"""Value formats of template fields (resource ids, names, checksums, durations, API versions, the build
timeout), each with what it allows. A value of the wrong form fails as a bad value whose explanation gives
the allowed form; a whole `<placeholder>`, as documentation templates carry, always passes (but for
`apiVersion`, which must be a version AIB has), and the JSON schema's patterns admit one too.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from workflows.template.api_versions import AIB_API_VERSIONS
from workflows.template.base import bad_value

_PLACEHOLDER = re.compile(r"<[^<>]+>")
_RESOURCE_GROUP_ID = r"/subscriptions/[^/]+/resourceGroups/[^/]+"
_GALLERY_IMAGE = _RESOURCE_GROUP_ID + r"/providers/Microsoft\.Compute/galleries/[^/]+/images/[^/]+"
_NAME = r"[A-Za-z0-9_.-]{1,64}"
_SHA256 = r"[0-9a-fA-F]{64}"
SUBNET_ID = _RESOURCE_GROUP_ID + r"/providers/Microsoft\.Network/virtualNetworks/[^/]+/subnets/[^/]+"


def _format(pattern: str, explanation: str, *, allow_empty: bool = False) -> AfterValidator:
    """A string check whose failure explains the allowed form. A whole `<placeholder>` always passes."""
    compiled = re.compile(pattern, re.IGNORECASE if pattern.startswith("/") else 0)

    def check(value: str) -> str:
        if (allow_empty and value == "") or _PLACEHOLDER.fullmatch(value) or compiled.fullmatch(value):
            return value
        raise bad_value(explanation)

    return AfterValidator(check)


# Names AIB checks against ^[A-Za-z0-9-_.]{1,64}$; the schema pattern also admits a <placeholder>.
ResourceName = Annotated[
    str,
    _format(_NAME, "It must be 1 to 64 letters, digits, '-', '_' or '.'."),
    Field(json_schema_extra={"pattern": rf"^(<[^<>]+>|{_NAME})$"}),
]
# In any case (PowerShell's Get-FileHash prints upper case); kept in lower case, as sha256sum prints it, so every
# comparison with a digest is case-insensitive.
Sha256 = Annotated[
    str,
    _format(
        _SHA256,
        "It must be the SHA-256 of the file as 64 hex digits, or empty to skip the check.",
        allow_empty=True,
    ),
    AfterValidator(lambda value: value if _PLACEHOLDER.fullmatch(value) else value.lower()),
    Field(json_schema_extra={"pattern": rf"^(<[^<>]+>|{_SHA256})?$"}),
]
ManagedImageId = Annotated[
    str,
    _format(
        _RESOURCE_GROUP_ID + r"/providers/Microsoft\.Compute/images/[^/]+",
        "It must be a managed image id: "
        "/subscriptions/<subscription>/resourceGroups/<group>/providers/Microsoft.Compute/images/<image>.",
    ),
]
GalleryImageId = Annotated[
    str,
    _format(
        _GALLERY_IMAGE + r"(/versions/[^/]+)?",
        "It must be an Azure Compute Gallery image definition id: /subscriptions/<subscription>/resourceGroups/"
        "<group>/providers/Microsoft.Compute/galleries/<gallery>/images/<definition>, "
        "optionally followed by /versions/<version>.",
    ),
]
ImageVersionId = Annotated[
    str,
    _format(
        rf"{_GALLERY_IMAGE}/versions/[^/]+|/(sharedGalleries|communityGalleries)/[^/]+/images/[^/]+/versions/[^/]+",
        "It must be an image version id: /subscriptions/<subscription>/resourceGroups/<group>/providers/"
        "Microsoft.Compute/galleries/<gallery>/images/<definition>/versions/<version or latest>, "
        "or a shared or community gallery image version id.",
    ),
]
SubnetId = Annotated[
    str,
    _format(
        SUBNET_ID,
        "It must be a subnet id: /subscriptions/<subscription>/resourceGroups/<group>/providers/"
        "Microsoft.Network/virtualNetworks/<vnet>/subnets/<subnet>.",
        allow_empty=True,
    ),
]
ResourceGroupId = Annotated[
    str,
    _format(
        _RESOURCE_GROUP_ID,
        "It must be a resource group id, /subscriptions/<subscription>/resourceGroups/<name>, "
        "or empty to have a staging group made for the build.",
        allow_empty=True,
    ),
]
DEFAULT_RESTART_TIMEOUT = "5m"
_GO_DURATION_PART = r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)"
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_FORM = (
    "It must be a duration of magnitude and unit, such as 5m, 30m, 1h30m or 2h, or empty for the default (5m)."
)


def duration_seconds(text: str) -> float:
    """A restartTimeout in seconds: a Go duration, as Packer's windows-restart provisioner parses it (``5m``,
    ``1h30m``, ``90s``).

    Raises:
        ValueError: ``text`` is not a duration; the message names the field and the allowed form.
    """
    if not re.fullmatch(f"(?:{_GO_DURATION_PART})+", text):
        raise ValueError(f"Field 'restartTimeout' has a bad value: '{text}'. {_DURATION_FORM}")
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in re.findall(_GO_DURATION_PART, text))


def _restart_timeout(value: str) -> str:
    if value == "":  # as AIB has it: the default
        return DEFAULT_RESTART_TIMEOUT
    if not _PLACEHOLDER.fullmatch(value):
        try:
            duration_seconds(value)
        except ValueError:
            raise bad_value(_DURATION_FORM) from None
    return value


RestartTimeout = Annotated[str, AfterValidator(_restart_timeout)]


def _api_version(value: str) -> str:
    if value not in AIB_API_VERSIONS:
        # ARM refuses a resource apiVersion its provider does not have.
        raise bad_value(f"It must be an API version of AIB: {', '.join(AIB_API_VERSIONS)}.")
    return value


ApiVersion = Annotated[str, AfterValidator(_api_version), Field(json_schema_extra={"enum": list(AIB_API_VERSIONS)})]
NonEmpty = Annotated[str, Field(min_length=1)]


def _build_timeout(minutes: int) -> int:
    if 1 <= minutes <= 5:
        raise bad_value(
            "AIB fails builds of 1 to 5 minutes at once ('client_jwt will expire within 5 minutes'): "
            "use 0 for the default of 240 minutes, or 6 to 960."
        )
    return minutes


# buildTimeoutInMinutes; its range (0 to 960) is on the field, beside its default.
BuildTimeoutMinutes = Annotated[int, AfterValidator(_build_timeout)]
