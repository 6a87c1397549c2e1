"""Bootable disks written from a VM's root filesystem, and read back, with no loop or partition device.

The layout is what Azure boots. Generation 2: a GPT with an EFI system partition (the image's own signed shim
and GRUB when it has them, a standalone GRUB otherwise) and the root; generation 1: an MBR with the root and
GRUB for BIOS in the gap before it. The root is found by UUID everywhere (fstab, GRUB), and GRUB boots
``/vmlinuz`` (the newest kernel the image has installed) with Azure's kernel command line. The partition table is
written into a sparse raw file, each filesystem is made in place at its partition's offset, and a VHD footer
appended to the raw disk makes it the fixed, 1 MiB-aligned VHD that Azure accepts.
"""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from activities.clouds.aib.vm_sizes import os_disk_too_small
from activities.clouds.base import PermanentError
from activities.clouds.local.base_image import AZURE_KERNEL_ARGS
from activities.clouds.local.host import CommandFailed, require_programs, run

MIB = 1 << 20
GIB = 1 << 30
SECTOR = 512
FOOTER = 512
ESP_BYTES = 64 * MIB
# Room for the journal, inode tables and group descriptors beside a filesystem's data.
FILESYSTEM_OVERHEAD = 256 * MIB
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
LINUX_FILESYSTEM = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GRUB_MODULES = "part_gpt part_msdos ext2 search search_fs_uuid linux serial terminal echo"
# The host programs that write a disk, and the Debian package of each.
DISK_PROGRAMS = {
    "sfdisk": "fdisk",
    "mke2fs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "grub-mkimage": "grub-common",
    "grub-mkstandalone": "grub-common",
    "qemu-img": "qemu-utils",
}
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")


@dataclass(frozen=True)
class Partition:
    """Where a filesystem lies in a disk: its byte offset and length."""

    offset: int
    size: int


@dataclass(frozen=True)
class WrittenDisk:
    generation: str
    size_bytes: int
    root_uuid: str
    root: Partition


def disk_size(*, data_bytes: int, source_bytes: int, os_disk_size_gb: int) -> int:
    """The captured disk's size: osDiskSizeGB when given, else the source's, grown to hold the image if it must.

    Raises:
        PermanentError: osDiskSizeGB is smaller than the source's disk (it can only grow, as on Azure), or than
            what the image holds.
    """
    needed = _round_up(data_bytes + data_bytes // 10 + FILESYSTEM_OVERHEAD + ESP_BYTES + 2 * MIB, GIB)
    if not os_disk_size_gb:
        return max(source_bytes, needed)
    size = os_disk_size_gb * GIB
    if problem := os_disk_too_small(os_disk_size_gb, source_bytes):
        raise PermanentError(problem, kind="OsDiskTooSmall")
    if size < needed:
        raise PermanentError(
            f"properties.vmProfile.osDiskSizeGB: {os_disk_size_gb} GB cannot hold the image's "
            f"{-(-data_bytes // MIB)} MiB (with room for its filesystem)",
            kind="OsDiskTooSmall",
        )
    return size


async def write_disk(root: Path, target: Path, *, generation: str, size: int) -> WrittenDisk:
    """Write ``root`` (a finished, writable view of the image's root filesystem) as a bootable fixed VHD.

    ``root`` gets its ``/etc/fstab`` here, by UUID. The disk appears at ``target`` whole or not at all.
    """
    require_programs(DISK_PROGRAMS, needed_by="capturing a bootable disk")
    root_uuid = str(uuid.uuid4())
    esp_id = os.urandom(4).hex().upper()
    raw = target.with_suffix(".raw")
    gen2 = generation == "V2"
    root_start = MIB + (ESP_BYTES if gen2 else 0)
    # A GPT keeps its backup in the disk's last sectors: the root ends 1 MiB before the end.
    root_part = Partition(offset=root_start, size=size - root_start - MIB)
    try:
        raw.unlink(missing_ok=True)
        with raw.open("wb") as disk:
            disk.truncate(size)
        await run("sfdisk", "-q", str(raw), input=_partition_table(gen2, root_part).encode())
        fstab = root / "etc" / "fstab"
        fstab.write_text(_fstab(fstab.read_text() if fstab.exists() else "", root_uuid, esp_id if gen2 else None))
        if gen2:
            (root / "boot" / "efi").mkdir(parents=True, exist_ok=True)
        await _make_root_filesystem(root, raw, root_part, root_uuid)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            config = Path(work) / "grub.cfg"
            config.write_text(_grub_config(root_uuid))
            if gen2:
                await _write_esp(raw, root, config, esp_id, Path(work))
            else:
                await _write_bios_loader(raw, config, root_part, Path(work))
            await append_vhd_footer(raw, size, Path(work))
        raw.rename(target)
    finally:
        raw.unlink(missing_ok=True)
    return WrittenDisk(generation=generation, size_bytes=size, root_uuid=root_uuid, root=root_part)


def _fstab(existing: str, root_uuid: str, esp_id: str | None) -> str:
    """The disk's root (and ESP) by UUID, ahead of every other line the image's fstab had: what customizers
    added stays, as it would on an Azure OS disk, so an entry that cannot mount fails the boot check."""
    lines = [f"UUID={root_uuid} / ext4 rw,discard,errors=remount-ro,x-systemd.growfs 0 1"]
    if esp_id is not None:
        lines.append(f"UUID={esp_id[:4]}-{esp_id[4:]} /boot/efi vfat umask=0077 0 0")
    for line in existing.splitlines():
        fields = line.split()
        if not (len(fields) > 1 and not fields[0].startswith("#") and fields[1] in ("/", "/boot/efi")):
            lines.append(line)
    return "\n".join(lines) + "\n"


def _partition_table(gen2: bool, root: Partition) -> str:
    if gen2:
        return (
            "label: gpt\nunit: sectors\n"
            f'start={MIB // SECTOR}, size={ESP_BYTES // SECTOR}, type={ESP_TYPE}, name="EFI System"\n'
            f'start={root.offset // SECTOR}, size={root.size // SECTOR}, type={LINUX_ROOT_X86_64}, name="root"\n'
        )
    return f"label: dos\nunit: sectors\nstart={root.offset // SECTOR}, size={root.size // SECTOR}, type=83, bootable\n"


async def _make_root_filesystem(root: Path, raw: Path, part: Partition, root_uuid: str) -> None:
    try:
        await run(
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-U",
            root_uuid,
            "-L",
            "root",
            "-E",
            f"offset={part.offset},lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            "-d",
            str(root),
            str(raw),
            f"{part.size // 1024}k",
        )
    except CommandFailed as err:
        raise PermanentError(
            f"the image does not fit its {part.size // MIB} MiB root partition: {err.stderr}", kind="OsDiskTooSmall"
        ) from err


def _grub_config(root_uuid: str) -> str:
    """One GRUB configuration for both generations: the root by UUID, the newest kernel, Azure's command line."""
    return f"""serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root {root_uuid}
linux /vmlinuz root=UUID={root_uuid} ro {AZURE_KERNEL_ARGS}
initrd /initrd.img
boot
"""


async def _write_esp(raw: Path, root: Path, config: Path, esp_id: str, work: Path) -> None:
    """The EFI system partition, made in place: the image's signed shim and GRUB (so the disk boots under
    Secure Boot, as Trusted Launch needs) with the config beside them, or a standalone GRUB that carries it."""
    shim = root / "usr/lib/shim/shimx64.efi.signed"
    signed_grub = root / "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
    loader = work / "BOOTX64.EFI"
    if not (shim.exists() and signed_grub.exists()):
        await run(
            "grub-mkstandalone",
            "-O",
            "x86_64-efi",
            "-o",
            str(loader),
            f"--modules={GRUB_MODULES}",
            f"--install-modules={GRUB_MODULES} normal configfile test",
            "--locales=",
            "--fonts=",
            "--themes=",
            f"boot/grub/grub.cfg={config}",
        )
    # -s 1: left to itself, mkfs.vfat sizes clusters for the whole disk file and the small FAT comes out broken.
    await run(
        "mkfs.vfat", f"--offset={MIB // SECTOR}", "-F", "32", "-s", "1", "-n", "EFI", "-i", esp_id,
        str(raw), str(ESP_BYTES // 1024),
    )  # fmt: skip
    esp = f"{raw}@@{MIB}"
    await run("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT")
    if loader.exists():
        await run("mcopy", "-i", esp, str(loader), "::/EFI/BOOT/BOOTX64.EFI")
    else:
        # The removable-media path firmware boots without a boot entry; signed GRUB reads grub.cfg beside it.
        for source, name in ((shim, "BOOTX64.EFI"), (signed_grub, "grubx64.efi"), (config, "grub.cfg")):
            await run("mcopy", "-i", esp, str(source), f"::/EFI/BOOT/{name}")


async def _write_bios_loader(raw: Path, config: Path, root: Partition, work: Path) -> None:
    """GRUB for BIOS: its core image in the gap after the MBR, and the MBR's boot code pointing at it.

    grub-bios-setup would do this, but it insists on finding the device of its own module folder (the host's
    disk); what it writes is two pointers, so they are written here.
    """
    core = work / "core.img"
    await run(
        "grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_PC_DIR), "-o", str(core), "-c", str(config),
        "-p", "(hd0,msdos1)/boot/grub", "biosdisk", *GRUB_MODULES.split(),
    )  # fmt: skip
    await asyncio.to_thread(embed_bios_boot, raw, (GRUB_PC_DIR / "boot.img").read_bytes(), core.read_bytes(), root)


def embed_bios_boot(raw: Path, boot_img: bytes, core_img: bytes, root: Partition) -> None:
    """What grub-bios-setup writes for an MBR disk: boot.img's code in sector 0 (the partition table and disk
    signature kept), pointing at core.img in sectors 1 on, whose first sector lists where the rest of it is."""
    boot = bytearray(boot_img)
    core = bytearray(core_img + bytes(-len(core_img) % SECTOR))
    sectors = len(core) // SECTOR
    if 1 + sectors > root.offset // SECTOR:
        raise RuntimeError(f"GRUB's core image ({sectors} sectors) does not fit before the root partition")
    with raw.open("r+b") as disk:
        mbr = disk.read(SECTOR)
        boot[0x66:0x68] = b"\x90\x90"  # boot.img's check for a floppy drive, skipped as it is for disks
        struct.pack_into("<Q", boot, 0x5C, 1)  # the sector core.img starts at
        boot[440:512] = mbr[440:512]  # disk signature, partition table, 0x55AA
        struct.pack_into("<QHH", core, 500, 2, sectors - 1, 0x820)  # core.img's rest: from sector 2, at 0x820:0
        disk.seek(0)
        disk.write(boot)
        disk.write(core)


async def append_vhd_footer(raw: Path, size: int, work: Path) -> None:
    """Turn the raw disk into a fixed VHD in place: the footer qemu-img writes for a disk of this size, appended."""
    model = work / "footer.vhd"
    await run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(model), str(size))
    with model.open("rb") as source:
        source.seek(-FOOTER, os.SEEK_END)
        footer = source.read(FOOTER)
    with raw.open("ab") as disk:
        disk.write(footer)


def root_partition(vhd: Path) -> Partition:
    """Where the root filesystem lies in a disk (a fixed VHD, or a raw disk): the Linux partition of its GPT or
    MBR, or the whole disk when it has no partition table (images of kiln before it wrote bootable disks)."""
    with vhd.open("rb") as disk:
        mbr = disk.read(SECTOR)
        if mbr[510:512] != b"\x55\xaa":
            return Partition(offset=0, size=vhd.stat().st_size - FOOTER)
        entries = [struct.unpack_from("<B3xBxxxII", mbr, 446 + 16 * i) for i in range(4)]
        if entries[0][1] == 0xEE:  # a protective MBR: the table is the GPT's
            disk.seek(SECTOR)
            header = disk.read(SECTOR)
            table_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
            disk.seek(table_lba * SECTOR)
            table = disk.read(count * entry_size)
            for i in range(count):
                entry = table[i * entry_size : (i + 1) * entry_size]
                kind = str(uuid.UUID(bytes_le=entry[:16])).upper()
                if kind in (LINUX_ROOT_X86_64, LINUX_FILESYSTEM):
                    first, last = struct.unpack_from("<QQ", entry, 32)
                    return Partition(offset=first * SECTOR, size=(last - first + 1) * SECTOR)
        else:
            for _, kind, first, count in entries:
                if kind == 0x83:
                    return Partition(offset=first * SECTOR, size=count * SECTOR)
    raise PermanentError(f"{vhd} has no Linux root partition", kind="SourceImageNotBootable")


async def unpack_root(vhd: Path, into: Path) -> None:
    """Copy the root filesystem of a disk to ``into``, owners, modes and xattrs included.

    It is mounted read-only from the file at its partition's offset, inside a mount namespace of its own, so the
    mount goes away with the command even if the worker dies.
    """
    part = root_partition(vhd)
    mountpoint = into.with_name(into.name + ".mnt")
    mountpoint.mkdir(parents=True, exist_ok=True)
    into.mkdir(parents=True)
    script = 'mount -o "loop,ro,noload,offset=$4,sizelimit=$5" "$1" "$2" && cp -a "$2/." "$3/"'
    try:
        await run(
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            "sh", str(vhd), str(mountpoint), str(into), str(part.offset), str(part.size),
        )  # fmt: skip
    except CommandFailed as err:
        raise RuntimeError(f"could not unpack {vhd}: {err.stderr}") from err
    finally:
        mountpoint.rmdir()


def tree_usage(root: Path) -> int:
    """Bytes the files under ``root`` take on disk, each rounded up to 4 KiB blocks."""
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            total += -(-os.lstat(os.path.join(folder, name)).st_size // 4096) * 4096
    return total


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
