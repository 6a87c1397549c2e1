"""What the local distribution targets share: their records' states, what ties a record to its target, the removal
of an unfinished output, and a finished one found again as the source of a later build.

Only a finished output counts as an image; anything else is what ``delete_output`` removes after an interrupted
distribution.
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from activities.clouds.aib.tags import ROLE_OUTPUT, kiln_tags
from activities.clouds.base import PermanentError
from activities.clouds.local import vhd_pages
from activities.clouds.local.accounts import KIND_BLOB, LocalAccounts
from activities.clouds.state import state_dir
from workflows.models import BuildContext, DistributeRequest
from workflows.template import Distributor

CREATING = "Creating"
SUCCEEDED = "Succeeded"
COMPLETED = "Completed"  # a region's replication status, as Azure reports it


@dataclass(frozen=True)
class LocalImage:
    """A local image ready to boot from: its VHD in the image cache (and its data disks', by LUN), and the version
    that pins it."""

    vhd_path: Path
    exact_version: str
    hyper_v_generation: str
    revoked: str = ""
    data_disks: tuple[Path, ...] = ()


def output_data(request: DistributeRequest, **data: Any) -> dict[str, Any]:
    """Record data that ties an output to its target, for ``delete_output``."""
    return {"targetIndex": request.index, "runOutputName": request.target.run_output_name, **data}


def output_tags(request: DistributeRequest) -> dict[str, str]:
    return kiln_tags(request.build.build_id, role=ROLE_OUTPUT, extra=request.target.artifact_tags)


def captured_vhd(request: DistributeRequest) -> Path:
    """The captured image's VHD file, which every target reads."""
    return _captured_file(request.image.uri)


def captured_disks(request: DistributeRequest) -> list[Path]:
    """The captured image's VHD files: its OS disk's, then each data disk's, by LUN (what an image holds, as
    against a VHD target, which is the OS disk alone)."""
    return [captured_vhd(request), *(_captured_file(uri) for uri in request.image.data_disk_snapshots)]


def _captured_file(uri: str) -> Path:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file":
        raise PermanentError(f"the captured image '{uri}' is not a file:// URI", kind="BadCapturedImage")
    return Path(urllib.parse.unquote(parsed.path))


async def image_vhd(accounts: LocalAccounts, url: str) -> Path:
    """A local copy of an image's blob in the image cache, downloaded (sparse) once.

    Raises:
        PermanentError: ``SourceImageNotFound`` when the blob is gone.
    """
    path = state_dir() / "image-cache" / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.vhd"
    if await asyncio.to_thread(path.exists):
        return path
    try:
        await vhd_pages.download(accounts.blob_at(url), path)
    except ResourceNotFoundError as err:
        raise PermanentError(f"the image's blob {url} is gone from local storage", kind="SourceImageNotFound") from err
    return path


async def delete_output(accounts: LocalAccounts, build: BuildContext, target: Distributor, index: int) -> None:
    """Delete the blobs and records an unfinished distribution of this target left; finished outputs stay."""
    records = await accounts.db(accounts.store.list, build_id=build.build_id)
    mine = [
        r
        for r in records
        if r.data.get("targetIndex") == index
        and r.data.get("runOutputName") == target.run_output_name
        and r.data.get("state") != SUCCEEDED
    ]
    for record in sorted(mine, key=lambda r: r.kind != KIND_BLOB):  # blobs before the records that own them
        if record.kind == KIND_BLOB:
            await accounts.delete_blob(record.id)
        await accounts.db(accounts.store.forget, record.id)
