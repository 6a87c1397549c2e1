"""A finished output of a local build as a disk file for another hypervisor (``kiln export``).

Every local output is a fixed VHD, which Azure and Hyper-V take as it is. Proxmox, OpenStack and libvirt take
qcow2 or raw, VMware a stream-optimized VMDK, newer Hyper-V VHDX: qemu-img converts to each, keeping the disk's
holes. The file appears at its path whole or not at all.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from activities.clouds.base import PermanentError
from activities.clouds.local import vhd_pages
from activities.clouds.local.host import require_programs
from activities.clouds.local.storage import LocalStorage
from workflows.models import RunOutput

# qemu-img's output format and options for each format kiln exports.
FORMATS: dict[str, list[str]] = {
    "qcow2": ["-O", "qcow2"],
    "raw": ["-O", "raw"],
    "vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"],  # what VMware's OVF import takes
    "vhdx": ["-O", "vhdx", "-o", "subformat=dynamic"],
}
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


async def export_output(
    storage: LocalStorage,
    output: RunOutput,
    destination: Path,
    disk_format: str,
    *,
    on_progress: Callable[[float], None] = lambda percent: None,
) -> None:
    """Write ``output`` (a VHD, managed image or gallery version of a local build) to ``destination``.

    Raises:
        PermanentError: the output is not there any more, or qemu-img failed (its message is kept).
    """
    require_programs({"qemu-img": "qemu-utils"}, needed_by="kiln export")
    partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.partial")
    async with AsyncExitStack() as cleanup:
        cleanup.callback(partial.unlink, missing_ok=True)
        vhd = await _output_vhd(storage, output, destination.parent, cleanup)
        await _convert(vhd, partial, FORMATS[disk_format], on_progress)
        await asyncio.to_thread(shutil.move, partial, destination)


async def _output_vhd(storage: LocalStorage, output: RunOutput, work: Path, cleanup: AsyncExitStack) -> Path:
    """The output's VHD on this machine: a VHD output is fetched from its page blob (only its written pages), an
    image is where the image cache keeps it."""
    if output.type != "VHD":
        return (await storage.locate_image(output.artifact_id)).vhd_path
    from azure.core.exceptions import ResourceNotFoundError

    copy = work / f".{output.run_output_name}.{uuid.uuid4().hex[:8]}.vhd"
    cleanup.callback(copy.unlink, missing_ok=True)
    try:
        await vhd_pages.download(storage.accounts.blob_at(output.artifact_uri), copy)
    except ResourceNotFoundError:
        raise PermanentError(f"the VHD {output.artifact_uri} is gone", kind="OutputNotFound") from None
    return copy


async def _convert(vhd: Path, target: Path, options: list[str], on_progress: Callable[[float], None]) -> None:
    process = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-p", "-f", "vpc", *options, str(vhd), str(target),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    errors = asyncio.ensure_future(process.stderr.read())
    while chunk := await process.stdout.read(4096):
        for found in _PROGRESS.finditer(chunk):
            on_progress(float(found.group(1)))
    if await process.wait() != 0:
        message = (await errors).decode(errors="replace").strip()
        raise PermanentError(f"qemu-img could not convert {vhd}: {message}", kind="ExportFailed")
