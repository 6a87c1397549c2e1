"""Copy-on-write roots for local VMs: an image below, a VM's own layer above, and a view of both for capture.

Every mount here lives in a mount namespace of its own process (a VM's, or a short-lived holder's), so it goes
away with that process, whatever becomes of the worker that made it; the host's mount table never holds one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from activities.clouds.local.host import CommandFailed, run


@dataclass(frozen=True)
class VmLayers:
    """What a VM's root filesystem is made of: its own layer on ``lower``, or (``lower`` None, where overlayfs
    cannot stack on the state folder) a whole copy of its image."""

    root: Path
    lower: Path | None


async def overlay_works(base: Path, scratch: Path) -> bool:
    """Whether overlayfs stacks a layer under ``scratch`` on ``base`` here; the probe mount vanishes with its
    namespace."""
    probe = scratch / f".overlay-probe-{os.getpid()}-{id(base)}"
    for sub in ("upper", "work", "merged"):
        (probe / sub).mkdir(parents=True, exist_ok=True)
    try:
        await run(
            "unshare", "--mount", "--propagation", "private", "mount", "-t", "overlay", "probe",
            "-o", f"lowerdir={base},upperdir={probe / 'upper'},workdir={probe / 'work'}", str(probe / "merged"),
        )  # fmt: skip
        return True
    except CommandFailed:
        return False
    finally:
        await asyncio.to_thread(shutil.rmtree, probe, True)


@asynccontextmanager
async def capture_view(layers: VmLayers, scratch: Path) -> AsyncIterator[Path]:
    """The stopped VM's root as its guest saw it, writable for what capture adds (fstab, the ESP's mount point)
    without touching the VM's own layer: an overlay of the VM's layers, read-only, under a scratch upper layer.

    The overlay is mounted in a mount namespace held by a helper process and reached through
    ``/proc/<pid>/root``, so the mount ends with the helper even if this worker dies. A VM on a whole copy of its
    image (no overlay here) is its own view: it is stopped, and deleted after capture.
    """
    if layers.lower is None:
        yield layers.root
        return
    lowers = f"{layers.root}:{layers.lower}"
    view = scratch / "view"
    for sub in ("upper", "work", "view"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    # The VM's layer goes on top as a lower layer: its whiteouts still hide what the guest deleted from the base.
    script = (
        'mount -t overlay kiln-capture -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" "$2/view" '
        "&& echo ready && read -r _"
    )
    holder = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", lowers, str(scratch),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None and holder.stderr is not None
    try:
        if await holder.stdout.readline() != b"ready\n":
            error = (await holder.stderr.read()).decode(errors="replace")
            raise RuntimeError(f"could not mount the capture view of {layers.root}: {error}")
        yield Path(f"/proc/{holder.pid}/root{view}")
    finally:
        holder.stdin.close()
        await holder.wait()
        await asyncio.to_thread(shutil.rmtree, scratch, True)
