"""Data disks of local VMs: additionalDataDisks (empty), or the data disks of the image a VM is made from.

A build VM's data disk is a sparse file in the VM's folder, attached to a loop device that the VM gets as a block
device (``/dev/sdc`` for LUN 0, ``/dev/sdd`` for LUN 1...), so a customizer formats, mounts and fills it as on
Azure. The VM also gets the names Azure's udev rules give data disks, ``/dev/disk/azure/scsi1/lun<N>`` (waagent's)
and ``/dev/disk/azure/data/by-lun/<N>`` (azure-vm-utils'), made by cloud-init at boot (``azure_disk_names``), as a
container has no udev of its own. Partitions are not scanned on a loop device here, so a partition table a customizer
writes is kept, but gives the VM no partition devices: format the whole disk.

The file and its loop device are each a resource of the build, recorded before they are made. A file's loop devices
are found in the kernel's own list (``/sys/block/loop*/loop/backing_file``), not in the record, so a worker that
died between attaching one and recording it leaves nothing a delete cannot find.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from activities.clouds.local.capture import vhd_file
from activities.clouds.local.host import CommandFailed, run
from activities.clouds.local.records import ResourceStore
from workflows.models import BuildContext, Resource

DISK_KIND = "dataDisk"
LOOP_KIND = "loopDevice"
GIB = 1 << 30
# The names Azure's udev rules give a data disk, by LUN.
AZURE_NAMES = ("/dev/disk/azure/scsi1/lun{lun}", "/dev/disk/azure/data/by-lun/{lun}")


def disk_id(vm: str, lun: int) -> str:
    return f"kiln-local/{DISK_KIND}/{vm}/lun{lun}"


def loop_id(vm: str, lun: int) -> str:
    return f"kiln-local/{LOOP_KIND}/{vm}/lun{lun}"


@dataclass(frozen=True)
class DataDisk:
    """A data disk to give a VM at ``lun``: empty, of ``size_bytes``, or a copy of an image's data disk (``vhd``)."""

    lun: int
    size_bytes: int
    vhd: Path | None = None


def empty_disks(sizes_gb: list[int]) -> list[DataDisk]:
    """additionalDataDisks of these sizes, at LUN 0, 1..."""
    return [DataDisk(lun, size * GIB) for lun, size in enumerate(sizes_gb)]


def image_disks(vhds: tuple[Path, ...]) -> list[DataDisk]:
    """Copies of an image's data disks (fixed VHDs, by LUN), as Azure makes a VM's disks from an image's."""
    return [DataDisk(lun, vhd_file(vhd).size_bytes, vhd) for lun, vhd in enumerate(vhds)]


def guest_device(lun: int) -> str:
    """Where a build VM has its data disk at ``lun``: after Azure's OS and resource disks, ``sda`` and ``sdb``, as
    the kernel names disks (``sdz``, then ``sdaa``)."""
    index, name = lun + 3, ""
    while index:
        index, letter = divmod(index - 1, 26)
        name = chr(ord("a") + letter) + name
    return f"/dev/sd{name}"


def azure_disk_names(devices: list[str]) -> list[str]:
    """Shell lines (cloud-init's ``bootcmd``) that give each data disk, by LUN, the names Azure's udev rules give
    it, as links to its device in the VM."""
    links = [(name.format(lun=lun), device) for lun, device in enumerate(devices) for name in AZURE_NAMES]
    if not links:
        return []
    folders = sorted({str(Path(link).parent) for link, _ in links})
    return [f"mkdir -p {' '.join(folders)}", *(f"ln -sfn {device} {link}" for link, device in links)]


def loop_devices() -> dict[str, str]:
    """Every loop device attached on this machine, and the file it is attached to (`` (deleted)`` when unlinked)."""
    attached = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            attached[f"/dev/{backing.parts[3]}"] = backing.read_text().strip()
        except FileNotFoundError:  # detached meanwhile
            continue
    return attached


def _loops_of(path: Path) -> list[str]:
    return [device for device, file in loop_devices().items() if file in (str(path), f"{path} (deleted)")]


class DataDisks:
    """Make, attach, detach and delete the data disks of local VMs; every worker on the machine shares their
    records."""

    def __init__(self, store: ResourceStore) -> None:
        self._store = store

    async def attach(
        self, build: BuildContext, vm: str, folder: Path, disks: list[DataDisk], tags: dict[str, str]
    ) -> list[str]:
        """Make each disk in ``folder`` and attach it to a loop device, unless an earlier attempt has.

        Returns:
            The host's loop device of each disk, by LUN.
        """
        devices = []
        for disk in disks:
            path = folder / f"lun{disk.lun}.raw"
            data = {"vm": vm, "lun": disk.lun, "file": str(path), "sizeBytes": disk.size_bytes}
            await asyncio.to_thread(
                self._store.record, disk_id(vm, disk.lun), kind=DISK_KIND, build_id=build.build_id, tags=tags, data=data
            )
            if not path.exists():
                await _make(path, disk)
            await asyncio.to_thread(
                self._store.record, loop_id(vm, disk.lun), kind=LOOP_KIND, build_id=build.build_id, tags=tags, data=data
            )
            attached = _loops_of(path)
            device = attached[0] if attached else (await run("losetup", "--find", "--show", str(path))).decode().strip()
            await asyncio.to_thread(self._store.update, loop_id(vm, disk.lun), {"device": device})
            devices.append(device)
        return devices

    async def detach(self, vm: str) -> None:
        """Detach the VM's disks from their loop devices, so their files hold all the VM wrote; succeeds when they
        are detached already."""
        for record in await asyncio.to_thread(self._store.list, kind=LOOP_KIND):
            if record.data.get("vm") == vm:
                for device in _loops_of(Path(record.data["file"])):
                    await _detach(device)
                await asyncio.to_thread(self._store.forget, record.id)

    async def delete(self, vm: str) -> None:
        """Detach and remove the VM's disks and their records; succeeds when they are already gone."""
        await self.detach(vm)
        for record in await asyncio.to_thread(self._store.list, kind=DISK_KIND):
            if record.data.get("vm") == vm:
                Path(record.data["file"]).unlink(missing_ok=True)
                await asyncio.to_thread(self._store.forget, record.id)

    @staticmethod
    def resources(vm: str, luns: int) -> list[Resource]:
        """The resources of a VM's data disks: each disk's file and its loop device."""
        return [
            Resource(id=make_id(vm, lun), kind=kind, owner=vm)
            for lun in range(luns)
            for make_id, kind in ((disk_id, DISK_KIND), (loop_id, LOOP_KIND))
        ]

    def files(self, vm: str) -> list[Path]:
        """The VM's disk files, by LUN."""
        records = [r for r in self._store.list(kind=DISK_KIND) if r.data.get("vm") == vm]
        return [Path(r.data["file"]) for r in sorted(records, key=lambda r: r.data["lun"])]


async def _make(path: Path, disk: DataDisk) -> None:
    """The disk's file, sparse, whole or not at all: empty, or the image's disk without its VHD footer."""
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    if disk.vhd is not None:
        await run("cp", "--sparse=always", "--reflink=auto", str(disk.vhd), str(partial))
    with partial.open("ab") as file:
        file.truncate(disk.size_bytes)
    partial.rename(path)


async def _detach(device: str) -> None:
    """Detach a loop device, and first drop the partitions a customizer's partitioner added to it (through the
    kernel's BLKPG calls): they would outlive the loop device and show on its next use."""
    name = Path(device).name
    for partition in sorted(Path(f"/sys/block/{name}").glob(f"{name}p*/partition")):
        await run("delpart", device, partition.read_text().strip(), check=False)
    try:
        await run("losetup", "--detach", device)
    except CommandFailed as err:
        if Path(f"/sys/block/{name}/loop/backing_file").exists():  # still attached: a real failure
            raise RuntimeError(f"could not detach {device}: {err.stderr}") from err
