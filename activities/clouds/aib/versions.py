"""Gallery image versions: how they sort, and which one a SharedImage target writes.

A gallery version is ``major.minor.patch``, each a 32-bit integer, and versions compare number by number
(1.10.0 comes after 1.9.0). A SharedImage target writes the version its ``galleryImageId`` pins
(``.../versions/<x.y.z>``, which must not exist yet); else, with ``versioning.scheme`` ``Source``, the source
image's version; else (``Latest``, the default) the patch after the highest existing version, of ``major`` when
set. AIB's example, for a gallery holding 0.1.1 ... 2.1.0: unset or 2 gives 2.1.1, 1 gives 1.2.1, 0 gives 0.1.3.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from activities.clouds.aib.ids import GalleryRef
from activities.clouds.base import PermanentError
from workflows.template import SharedImageDistributor

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """A gallery version ``major.minor.patch``, each a 32-bit integer; None for anything else."""
    found = _VERSION.match(text)
    if not found:
        return None
    parts = tuple(int(p) for p in found.groups())
    return parts if all(p < 2**31 for p in parts) else None  # type: ignore[return-value]


def version_key(version: str) -> tuple[int, ...]:
    """What versions sort by, so the highest is what ``latest`` means: their parts compared as numbers (1.10.0
    after 1.9.0), a part that is not a number before any that is."""
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def next_version(existing: Collection[str], major: int = -1) -> str:
    """The version the ``Latest`` scheme gives: the patch after the highest existing version (of ``major``, when
    set), or the first version of a major that has none."""
    versions = [v for v in map(parse_version, existing) if v]
    if major >= 0:
        versions = [v for v in versions if v[0] == major]
    if not versions:
        return "0.0.1" if major == 0 else f"{max(major, 1)}.0.0"
    a, b, c = max(versions)
    return f"{a}.{b}.{c + 1}"


def choose_version(
    target: SharedImageDistributor, ref: GalleryRef, *, index: int, source_version: str, existing: Collection[str]
) -> str:
    """The version ``target`` (``properties.distribute[index]``, writing to ``ref``'s image definition) writes,
    given the versions that definition holds.

    Raises:
        PermanentError: ``BadSharedImageDistribute`` when the pinned version is not a gallery version, or exists.
    """
    field = f"properties.distribute[{index}]"
    versioning = target.versioning
    if ref.version is not None:
        pinned, why = ref.version, f"{field}.galleryImageId"
    elif versioning is not None and versioning.scheme == "Source":
        pinned, why = source_version, f"{field}.versioning.scheme"
    else:
        return next_version(existing, versioning.major if versioning is not None else -1)
    if parse_version(pinned) is None:
        raise PermanentError(
            f"{why}: '{pinned}' is not a gallery image version (major.minor.patch, 32-bit integers)",
            kind="BadSharedImageDistribute",
        )
    if pinned in existing:
        raise PermanentError(
            f"{why}: version {pinned} of {ref.image_id} already exists", kind="BadSharedImageDistribute"
        )
    return pinned
