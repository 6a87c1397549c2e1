"""Capture a stopped local build VM: its root, as its guest left it, written as a bootable fixed VHD, and each of
its data disks as a fixed VHD of its own.

kiln's own files in the guest (its script runs) are left out; everything else is the image, deprovisioned by the
build's last step as AIB's is.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from activities.clouds.local.disks import WrittenDisk, append_vhd_footer, disk_size, tree_usage, write_disk
from activities.clouds.local.host import run
from activities.clouds.local.overlays import VmLayers, capture_view
from activities.guest.ssh import GUEST_DIR


@dataclass(frozen=True)
class VhdFile:
    path: Path
    size_bytes: int
    used_bytes: int


def vhd_file(path: Path) -> VhdFile:
    """A fixed VHD's virtual size (the file less its 512-byte footer) and the bytes it takes on disk."""
    info = path.stat()
    return VhdFile(path=path, size_bytes=info.st_size - 512, used_bytes=info.st_blocks * 512)


async def capture_disk(
    layers: VmLayers, target: Path, *, generation: str, source_bytes: int, os_disk_size_gb: int
) -> WrittenDisk:
    """Write the stopped VM's root as a bootable disk at ``target``, sized as ``disks.disk_size`` says."""
    scratch = target.with_name(f".{target.name}.capture")
    await asyncio.to_thread(shutil.rmtree, scratch, True)  # what a worker that died mid-capture left
    async with capture_view(layers, scratch) as root:
        await asyncio.to_thread(shutil.rmtree, root / GUEST_DIR.lstrip("/"), True)
        data = await asyncio.to_thread(tree_usage, root)
        size = disk_size(data_bytes=data, source_bytes=source_bytes, os_disk_size_gb=os_disk_size_gb)
        return await write_disk(root, target, generation=generation, size=size)


async def capture_data_disk(disk: Path, target: Path) -> None:
    """Write a stopped VM's data disk (a raw file, detached) as a fixed VHD at ``target``: a sparse copy with the VHD
    footer appended, whole or not at all."""
    raw = target.with_suffix(".raw")
    try:
        await run("cp", "--sparse=always", "--reflink=auto", str(disk), str(raw))
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            await append_vhd_footer(raw, disk.stat().st_size, Path(work))
        raw.rename(target)
    finally:
        raw.unlink(missing_ok=True)
