"""Validation VMs: the captured disk itself, booted for real in QEMU, before anything of it is distributed.

The disk is opened read-only (``snapshot=on``), so the image stays as captured, and so is each of the image's data
disks, beside it, which the guest finds by the names Azure gives data disks (``data_disks.py``). The firmware is the
generation's: OVMF (UEFI) for Gen2, SeaBIOS for Gen1. KVM is used where ``/dev/kvm`` really runs a guest (a
probe boot, not the device's permissions, says so), TCG otherwise. A NoCloud seed on a second small disk gives
the validator's user its key and the VM the SSH host key kiln pins, as Azure provisions a VM made from an image.
The guest's only network is user-mode, with no way out, and its sshd forwarded to a loopback address of its
own. The serial console goes to a file: a boot that shows it went wrong (emergency mode, a kernel panic, a
boot loader that cannot find its kernel) fails at once, naming what it showed; one that never reaches SSH fails
at its bound. Either way the console's log is what the build keeps.

QEMU runs in a session of its own, so it outlives the worker that started it, and in the VM's cgroups, where
any worker finds and stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from activities.clouds.aib.names import admin_user_of
from activities.clouds.aib.tags import ROLE_TEMPORARY, kiln_tags
from activities.clouds.base import PermanentError
from activities.clouds.local import cgroups
from activities.clouds.local.host import file_lock, require_programs, ssh_answers, to_the_end
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.sizes import VmLimits, limits_for
from activities.clouds.local.vm import (
    ADDRESS_KIND,
    SSH_PORT,
    address_id,
    claim_address,
    cloud_config,
    live_pid,
    record_pid,
)
from activities.guest.keys import derive_key, public_line
from workflows.models import BuildContext, BuildVm, Resource, VmSpec

QEMU_KIND = "qemu"
# Generous for a full systemd and cloud-init boot under TCG on a busy machine; KVM boots take seconds.
BOOT_TIMEOUT_SECONDS = {"kvm": 180.0, "tcg": 600.0}
MEMORY_CAP_BYTES = 4 << 30
QEMU_PROGRAMS = {"qemu-system-x86_64": "qemu-system-x86", "mkfs.vfat": "dosfstools", "mcopy": "mtools"}
# Under TCG, CX16 is left out: QEMU 7.2 mis-emulates the gs-relative cmpxchg16b that the slab allocator of newer
# kernels uses (Debian's 6.12 double-faults early in boot), and without it they take their plain path.
CPU_MODELS = {"kvm": "host", "tcg": "qemu64,-cx16"}
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Console lines after which a boot cannot reach SSH: it stopped in emergency mode, panicked, or never loaded Linux.
BOOT_FAILED = re.compile(
    r"You are in emergency mode|Give root password for maintenance|Cannot open access to console|"
    r"Kernel panic|error: (?:file '/(?:vmlinuz|initrd\.img)' not found|no such device: [0-9a-f-]{36}|"
    r"you need to load the kernel first)|"
    # A mount that fails fails the boot only when the root is on it or local-fs.target needs it (no nofail).
    r"Failed to mount (?:sysroot|-)\.mount[^\n]*|Dependency failed for [^\n]*(?:Local File Systems|Initrd Root Device)"
)
# A panic that says the emulated timer came too late: a host too busy to emulate the machine in time, not a fault
# of the image, so the boot is tried again.
EMULATION_TOO_SLOW = re.compile(r"IO-APIC \+ timer doesn't work")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
# A kernel under working KVM prints its first line within a second; under TCG within about two.
KVM_PROBE_SECONDS = 8.0


def qemu_id(name: str) -> str:
    return f"kiln-local/{QEMU_KIND}/{name}"


@dataclass(frozen=True)
class QemuFolder:
    path: Path

    @property
    def seed(self) -> Path:
        return self.path / "seed.img"

    @property
    def vars(self) -> Path:
        return self.path / "efivars.fd"

    @property
    def console(self) -> Path:
        return self.path / "console.log"

    @property
    def pid(self) -> Path:
        return self.path / "qemu.pid"

    @property
    def launcher(self) -> Path:
        return self.path / "launch.sh"


class BootFailed(PermanentError):
    """The image did not boot; ``console`` is the serial console's log."""

    def __init__(self, message: str, console: bytes) -> None:
        super().__init__(message, kind="BootFailed")
        self.console = console


class QemuVms:
    """Boot, wait for and delete validation VMs; every worker on the machine shares their records."""

    def __init__(self, *, state: Path, store: ResourceStore, secret: bytes) -> None:
        self._state = state
        self._vms = state / "qemu"
        self._store = store
        self._secret = secret

    def folder(self, name: str) -> QemuFolder:
        return QemuFolder(self._vms / name)

    def console(self, name: str) -> bytes:
        """What the VM's serial console has printed so far, without its terminal control codes (a log to read)."""
        try:
            return _plain(self.folder(name).console.read_bytes()).encode()
        except FileNotFoundError:
            return b""

    async def create(
        self, build: BuildContext, spec: VmSpec, disk: Path, data_disks: Sequence[Path] = ()
    ) -> tuple[BuildVm, float]:
        """Boot ``disk`` with ``data_disks`` (by LUN) and wait for its sshd (or attach to the boot a previous
        attempt started).

        Returns:
            The VM, and the seconds from QEMU's start to SSH.

        Raises:
            BootFailed: the console showed the boot fail, or SSH did not answer within the bound.
        """
        name = spec.name
        folder = self.folder(name)
        limits = limits_for(spec.vm_profile.vm_size, spec.source.hyper_v_generation)
        async with file_lock(self._vms / f"{name}.lock"):
            record = await asyncio.to_thread(self._store.get, qemu_id(name))
            running = record is not None and live_pid(folder.pid) is not None
            if not running:
                require_programs(QEMU_PROGRAMS, needed_by=f"booting validation VM {name}")
                tags = kiln_tags(build.build_id, role=ROLE_TEMPORARY, extra=build.managed_resource_tags)
                data = record.data if record is not None else {
                    "address": await asyncio.to_thread(claim_address, self._store, build, name, tags),
                    "port": SSH_PORT,
                    "adminUser": admin_user_of(build.build_id),
                    "hostKey": public_line(derive_key(self._secret, build.build_id, "host")),
                    "folder": str(folder.path),
                    "disk": str(disk),
                    "dataDisks": [str(path) for path in data_disks],
                    "hyperVGeneration": spec.source.hyper_v_generation,
                    "accelerator": await accelerator(self._state),
                }  # fmt: skip
                if record is None:  # recorded before anything is made
                    await asyncio.to_thread(
                        self._store.record, qemu_id(name), kind=QEMU_KIND, build_id=build.build_id, tags=tags, data=data
                    )
                await asyncio.to_thread(cgroups.kill_all, name)  # what of an earlier attempt still runs
                await to_the_end(self._start(build, name, folder, data, limits))
            else:
                data = record.data
            seconds = await self._wait_for_ssh(name, folder, data)
            return self._build_vm(name, data), seconds

    async def delete(self, name: str) -> None:
        """Stop the VM and remove its files and records; succeeds if it is already gone."""
        folder = self.folder(name)
        async with file_lock(self._vms / f"{name}.lock"):
            await self._kill(name, folder)
            await asyncio.to_thread(cgroups.remove_cgroups, name)
            for record in await asyncio.to_thread(self._store.list, kind=ADDRESS_KIND):
                if record.data.get("vm") == name:
                    await asyncio.to_thread(self._store.forget, record.id)
            await asyncio.to_thread(shutil.rmtree, folder.path, True)
            await asyncio.to_thread(self._store.forget, qemu_id(name))
            (self._vms / f"{name}.lock").unlink(missing_ok=True)

    async def _start(self, build: BuildContext, name: str, folder: QemuFolder, data: dict, limits: VmLimits) -> None:
        """The VM's seed, firmware variables and cgroups, then QEMU itself: all of it, or (the worker dying) none."""
        await asyncio.to_thread(self._prepare, build, folder, data)
        groups = await asyncio.to_thread(cgroups.make_cgroups, name, limits)
        await self._launch(folder, data, groups, limits.cpus, min(limits.memory_bytes, MEMORY_CAP_BYTES))

    async def _kill(self, name: str, folder: QemuFolder) -> None:
        await asyncio.to_thread(cgroups.kill_all, name)
        if (pid := live_pid(folder.pid)) is not None:  # where the machine gave it no cgroups
            with suppress(ProcessLookupError):  # it may end between the look and the kill
                os.kill(pid, signal.SIGKILL)

    def _prepare(self, build: BuildContext, folder: QemuFolder, data: dict) -> None:
        """The VM's folder: its NoCloud seed disk, and for UEFI a copy of the firmware's variable store."""
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.console.unlink(missing_ok=True)
        seed = folder.path / "seed"
        seed.mkdir(exist_ok=True)
        login = public_line(derive_key(self._secret, build.build_id, "client"), "kiln")
        host_key = derive_key(self._secret, build.build_id, "host")
        devices = [f"/dev/disk/by-id/virtio-{_serial(lun)}" for lun in range(len(data.get("dataDisks", [])))]
        config = cloud_config(data["adminUser"], login, host_key, data_disks=devices)
        (seed / "user-data").write_text("#cloud-config\n" + json.dumps(config))
        hostname = folder.path.name[:63]
        meta = {"instance-id": f"{hostname}-{uuid.uuid4().hex[:12]}", "local-hostname": hostname}
        (seed / "meta-data").write_text(json.dumps(meta) + "\n")
        folder.seed.unlink(missing_ok=True)
        subprocess.run(["mkfs.vfat", "-C", "-n", "CIDATA", str(folder.seed), "1024"], check=True, capture_output=True)
        subprocess.run(
            ["mcopy", "-i", str(folder.seed), str(seed / "user-data"), str(seed / "meta-data"), "::/"],
            check=True, capture_output=True,
        )  # fmt: skip
        if data["hyperVGeneration"] == "V2":
            shutil.copyfile(OVMF_VARS, folder.vars)

    async def _launch(self, folder: QemuFolder, data: dict, groups: list[Path], cpus: float, memory: int) -> None:
        q = shlex.quote
        forward = f"hostfwd=tcp:{data['address']}:{data['port']}-:{SSH_PORT}"
        argv = [
            "qemu-system-x86_64", "-accel", data["accelerator"], "-cpu", CPU_MODELS[data["accelerator"]],
            "-smp", str(max(1, int(cpus))),
            "-m", f"{memory >> 20}M", "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{folder.console}",
            "-drive", f"file={data['disk']},format=vpc,if=virtio,snapshot=on",
            *(
                option
                for lun, path in enumerate(data.get("dataDisks", []))
                for option in (
                    "-drive", f"file={path},format=vpc,if=none,id={_serial(lun)},snapshot=on",
                    "-device", f"virtio-blk-pci,drive={_serial(lun)},serial={_serial(lun)}",
                )
            ),
            "-drive", f"file={folder.seed},format=raw,if=virtio,readonly=on",
            # restrict=on: the guest reaches nothing; only the forward to its sshd comes in.
            "-netdev", f"user,id=net0,restrict=on,{forward}", "-device", "virtio-net-pci,netdev=net0",
        ]  # fmt: skip
        if data["hyperVGeneration"] == "V2":
            argv += [
                "-machine", "q35",
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={folder.vars}",
            ]  # fmt: skip
        else:
            argv += ["-machine", "pc"]  # SeaBIOS
        # snapshot=on writes the guest's changes to a temporary file in TMPDIR: the VM's own folder.
        folder.launcher.write_text(
            f"{cgroups.join_command(groups)}\n{record_pid(folder.pid)}\n"
            f"TMPDIR={q(str(folder.path))} exec {' '.join(map(q, argv))} < /dev/null\n"
        )
        folder.pid.unlink(missing_ok=True)
        errors = folder.path / "qemu.err"
        with errors.open("wb") as output:
            launcher = await asyncio.create_subprocess_exec(
                "setsid",
                "-f",
                "sh",
                str(folder.launcher),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
            await launcher.wait()

    async def _wait_for_ssh(self, name: str, folder: QemuFolder, data: dict) -> float:
        started = folder.path.stat().st_mtime if not folder.pid.exists() else folder.pid.stat().st_mtime
        bound = BOOT_TIMEOUT_SECONDS[data["accelerator"]]
        while not await ssh_answers(data["address"], data["port"]):
            console = self.console(name)
            if (slow := EMULATION_TOO_SLOW.search(_plain(console))) is not None:
                await self._kill(name, folder)
                raise RuntimeError(f"validation VM {name} panicked at boot ('{slow.group(0)}'): the host was too busy")
            failed = BOOT_FAILED.search(_plain(console))
            if failed is not None:
                await asyncio.sleep(2)  # the lines that explain it come right after
                raise BootFailed(f"the image did not boot: its console showed '{failed.group(0)}'", self.console(name))
            if time.time() - started > bound:
                raise BootFailed(f"the image did not reach SSH within {bound:.0f} s of booting", console)
            if folder.pid.exists() and live_pid(folder.pid) is None:
                why = (folder.path / "qemu.err").read_text(errors="replace").strip()
                raise BootFailed(f"QEMU stopped before the image reached SSH{': ' + why if why else ''}", console)
            await asyncio.sleep(0.25)
        return time.time() - started

    def _build_vm(self, name: str, data: dict) -> BuildVm:
        return BuildVm(
            name=name,
            host=data["address"],
            port=data["port"],
            admin_user=data["adminUser"],
            host_key=data["hostKey"],
            os_type="Linux",
            resources=[
                Resource(id=qemu_id(name), kind=QEMU_KIND, owner=name),
                Resource(id=address_id(data["address"]), kind=ADDRESS_KIND, owner=name),
            ],
        )


def _serial(lun: int) -> str:
    """The serial number of a data disk's drive, which names it in the guest (``/dev/disk/by-id/virtio-<serial>``)."""
    return f"lun{lun}"


def console_tail(console: bytes, lines: int = 25) -> str:
    """The last lines of a serial console, without its terminal control codes."""
    return "\n".join(_plain(console).splitlines()[-lines:])


def _plain(console: bytes) -> str:
    return _ANSI.sub("", console.decode(errors="replace"))


async def accelerator(state: Path) -> str:
    """``kvm`` if a guest really runs under KVM here, else ``tcg`` (``KILN_ACCEL`` says which, to skip the probe).

    ``/dev/kvm`` can exist where guests hang under it (no virtualization extensions reach a machine that is itself
    a VM), and even firmware runs there: the probe boots a kernel (a base's) and waits a few seconds for its first
    words. The verdict is kept in the state folder per host kernel, so it is probed once.
    """
    if forced := os.environ.get("KILN_ACCEL"):
        return forced
    verdict = state / "qemu" / f"accelerator-{os.uname().release}"
    if verdict.exists():
        return verdict.read_text().strip()
    kernels = sorted(state.glob("images/base/*/*/rootfs/boot/vmlinuz-*"))
    chosen = "kvm" if Path("/dev/kvm").exists() and kernels and await _kvm_boots(kernels[-1]) else "tcg"
    verdict.parent.mkdir(parents=True, exist_ok=True)
    verdict.write_text(chosen + "\n")
    return chosen


async def _kvm_boots(kernel: Path) -> bool:
    probe = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert probe.stdout is not None
    try:
        seen = b""
        async with asyncio.timeout(KVM_PROBE_SECONDS):
            while b"Linux version" not in seen and (chunk := await probe.stdout.read(4096)):
                seen += chunk
        return b"Linux version" in seen
    except TimeoutError:
        return False
    finally:
        if probe.returncode is None:
            probe.kill()
        await probe.wait()
