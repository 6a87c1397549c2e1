"""Capture a stopped local VM as a fixed VHD: its root filesystem written into ext4, the way Azure stores disks.

The VHD holds a bare ext4 filesystem (no partition table, no boot loader): what distribution needs and what
a later build unpacks as its base. Its virtual size is a whole number of MiB, as Azure requires of a VHD.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from activities.clouds.base import PermanentError
from activities.clouds.local.host import CommandFailed, run
from activities.clouds.local.images import tree_usage
from activities.clouds.local.vm import GUEST_FILES, VmLayers

MIB = 1 << 20
GIB = 1 << 30
# Room for the journal, inode tables and group descriptors of a filesystem sized to its contents.
FILESYSTEM_OVERHEAD_BYTES = 64 * MIB
INODE_BYTES = 256


@dataclass(frozen=True)
class VhdFile:
    path: Path
    size_bytes: int
    used_bytes: int


def vhd_file(path: Path) -> VhdFile:
    """A fixed VHD's virtual size (the file less its 512-byte footer) and the bytes it takes on disk."""
    info = path.stat()
    return VhdFile(path=path, size_bytes=info.st_size - 512, used_bytes=info.st_blocks * 512)


async def write_vhd(layers: VmLayers, target: Path, *, os_disk_size_gb: int) -> VhdFile:
    """Write the VM's root filesystem, less kiln's own guest files, to ``target`` as a fixed VHD."""
    await asyncio.to_thread(shutil.rmtree, layers.root / GUEST_FILES, True)
    partial = target.with_suffix(".partial")
    try:
        async with merged_view(layers) as view:
            data_bytes, entries = await asyncio.to_thread(tree_usage, view)
            if os_disk_size_gb:
                size = os_disk_size_gb * GIB
                if data_bytes > size:
                    raise PermanentError(
                        f"properties.vmProfile.osDiskSizeGB: {os_disk_size_gb} GB cannot hold the image's "
                        f"{-(-data_bytes // MIB)} MiB",
                        kind="OsDiskTooSmall",
                    )
            else:
                size = _round_up(int(data_bytes * 1.1) + entries * INODE_BYTES + FILESYSTEM_OVERHEAD_BYTES, MIB)
            await _make_disk(
                view, partial, size=size, inodes=entries + entries // 4 + 1024, fixed_size=bool(os_disk_size_gb)
            )
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return vhd_file(target)


async def _make_disk(view: Path, vhd: Path, *, size: int, inodes: int, fixed_size: bool) -> None:
    """A fixed VHD of ``size`` bytes whose disk is an ext4 filesystem of ``view``.

    qemu-img lays out the empty (sparse) disk and its footer, and mke2fs -d fills the disk in place, so the
    data is written once rather than once more by a conversion. A filesystem sized to its contents grows
    until they fit.
    """
    for _ in range(4):
        vhd.unlink(missing_ok=True)
        # force_size keeps the virtual size exactly ``size`` rather than rounding it to a CHS geometry.
        await run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(vhd), str(size))
        try:
            # The explicit size keeps mke2fs off the footer that follows the disk.
            await run(
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-E",
                "nodiscard",
                "-N",
                str(inodes),
                "-d",
                str(view),
                str(vhd),
                f"{size // MIB}M",
            )
            return
        except CommandFailed as err:
            if fixed_size:
                raise PermanentError(
                    f"properties.vmProfile.osDiskSizeGB: the image does not fit in {size // GIB} GB: {err.stderr}",
                    kind="OsDiskTooSmall",
                ) from err
            size = _round_up(size * 5 // 4, MIB)
    raise RuntimeError(f"mke2fs could not fit {view} in {size // MIB} MiB")


@asynccontextmanager
async def merged_view(layers: VmLayers) -> AsyncIterator[Path]:
    """The VM's root as the guest saw it, read-only. For an overlay VM that is a read-only overlay of its layer
    on the base, mounted in a mount namespace held by a helper process and reached through ``/proc/<pid>/root``,
    so the mount ends with the helper even if this worker dies."""
    if layers.lower is None:
        yield layers.root
        return
    view = layers.root.parent / "view"
    view.mkdir(exist_ok=True)
    # The layer goes on top as a lower layer: its whiteouts still hide what the guest deleted from the base.
    script = 'mount -t overlay kiln-view -o ro,lowerdir="$1:$2" "$3" && echo ready && read -r _'
    holder = await asyncio.create_subprocess_exec(
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        str(layers.root),
        str(layers.lower),
        str(view),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None and holder.stderr is not None
    try:
        if await holder.stdout.readline() != b"ready\n":
            error = (await holder.stderr.read()).decode(errors="replace")
            raise RuntimeError(f"could not mount the merged view of {layers.root}: {error}")
        yield Path(f"/proc/{holder.pid}/root{view}")
    finally:
        holder.stdin.close()
        await holder.wait()
        view.rmdir()


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
