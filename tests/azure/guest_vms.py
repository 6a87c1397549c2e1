"""Stand-ins for the VMs the ARM emulator makes: real SSH endpoints that behave as Azure's Linux VMs do.

A guest is an ``unshare`` of mount, PID, UTS and IPC namespaces whose PID 1 mounts an overlay (this machine's
own root below, the guest's layer above), pivots into it and becomes the guest's sshd, on a loopback address of
its own (127.x.y.z:22). It starts in a tenth of a second, so the Azure tests can make as many VMs as a build
does; what runs inside is the host's own userland, with the agent and tools an Azure image has stood in for by
``environment.py``. (The local cloud's own build VMs are real systemd machines: ``activities/clouds/local/vm.py``.)
It is started detached (``setsid``), so it outlives the worker that made it, and its folder, address and
cgroups are recorded in a resource store before they are made, so any worker can find and delete them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from activities.clouds.aib.names import admin_user_of
from activities.clouds.aib.tags import ROLE_TEMPORARY, kiln_tags
from activities.clouds.base import PermanentError
from activities.clouds.local import cgroups
from activities.clouds.local.host import CommandFailed, file_lock, require_programs, run
from activities.clouds.local.overlays import VmLayers, overlay_works
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.sizes import limits_for
from activities.guest.keys import derive_key, private_openssh, public_line
from activities.guest.ssh import GUEST_DIR
from workflows.models import BuildContext, BuildVm, Resource, VmSpec

VM_KIND = "vm"
ADDRESS_KIND = "address"
OVERLAY_KIND = "overlay"
SSH_PORT = 22
BOOT_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# The kiln files in a guest (script runs, the admin user's name for deprovision): never part of an image.
GUEST_FILES = GUEST_DIR.lstrip("/")
# The host programs a VM's boot runs (the boot script's, before it pivots into the VM's root), by package.
BOOT_PROGRAMS = {
    "setsid": "util-linux",
    "unshare": "util-linux",
    "pivot_root": "util-linux",
    "mount": "mount",
    "umount": "mount",
    "mknod": "coreutils",
    "ip": "iproute2",
}
# What the VM's own root must hold for anything to answer SSH in it.
GUEST_SSHD = "usr/sbin/sshd"


def vm_id(name: str) -> str:
    return f"kiln-local/{VM_KIND}/{name}"


def overlay_id(name: str) -> str:
    return f"kiln-local/{OVERLAY_KIND}/{name}"


def address_id(address: str) -> str:
    return f"kiln-local/{ADDRESS_KIND}/{address}"


@dataclass(frozen=True)
class VmFolder:
    """Where one VM's files live: its writable layer, the overlay's work and mount folders, its boot files."""

    path: Path

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def work(self) -> Path:
        return self.path / "work"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def pid_file(self) -> Path:
        return self.path / "pid"

    @property
    def console(self) -> Path:
        return self.path / "console.log"

    @property
    def boot_script(self) -> Path:
        return self.path / "boot.sh"

    @property
    def etc(self) -> Path:
        """hosts, hostname and resolv.conf, mounted over the guest's own: they describe this VM, not the image."""
        return self.path / "etc"


class GuestVms:
    """Create, stop and delete the test guests; every worker process of a test shares their records."""

    def __init__(self, *, state: Path, store: ResourceStore, secret: bytes) -> None:
        self._vms = state / "vms"
        self._store = store
        self._secret = secret

    def folder(self, name: str) -> VmFolder:
        return VmFolder(self._vms / name)

    def recorded(self, owner: str) -> list[str]:
        """The ids of the records of the guests made for ``owner`` (the VM they stand for)."""
        return [record.id for record in self._store.list(build_id=owner)]

    async def layers(self, name: str) -> VmLayers:
        """The writable layer of a VM (its whole root on a copy) and the base below it."""
        record = await asyncio.to_thread(self._store.get, vm_id(name))
        if record is None:
            raise PermanentError(f"there is no local VM named {name}", kind="VmNotFound")
        lower = record.data["lower"]
        folder = self.folder(name)
        return VmLayers(root=folder.upper if lower else folder.merged, lower=Path(lower) if lower else None)

    async def create(self, build: BuildContext, spec: VmSpec, base: Path) -> BuildVm:
        """Boot a VM on ``base``, or return the one a previous attempt of this create made (create-or-get)."""
        name = _checked_name(spec.name)
        limits = limits_for(spec.vm_profile.vm_size, spec.source.hyper_v_generation)
        folder = self.folder(name)
        async with file_lock(self._vms / f"{name}.lock"):
            record = await asyncio.to_thread(self._store.get, vm_id(name))
            if record is not None and running(folder) is not None:
                return self._build_vm(name, record.data)
            require_programs(BOOT_PROGRAMS, needed_by=f"booting VM {name}")
            if not (base / GUEST_SSHD).exists():
                raise PermanentError(
                    f"VM {name} cannot boot: its root {base} has no /{GUEST_SSHD} (Debian package openssh-server), "
                    "so nothing in it would answer SSH",
                    kind="GuestNotBootable",
                )
            tags = kiln_tags(build.build_id, role=ROLE_TEMPORARY, extra=build.managed_resource_tags)
            host_key = derive_key(self._secret, build.build_id, "host")
            if record is None:
                data = {
                    "address": await asyncio.to_thread(self._claim_address, build, name, tags),
                    "adminUser": admin_user_of(build.build_id),
                    "hostKey": public_line(host_key),
                    "folder": str(folder.path),
                    "hyperVGeneration": spec.source.hyper_v_generation,
                    "vmSize": limits.size,
                    "lower": str(base) if await overlay_works(base, self._vms) else None,
                }
                # Recorded before anything is made: a worker that dies from here on leaves a record to clean up by.
                await asyncio.to_thread(
                    self._store.record, vm_id(name), kind=VM_KIND, build_id=build.build_id, tags=tags, data=data
                )
                await asyncio.to_thread(
                    self._store.record,
                    overlay_id(name),
                    kind=OVERLAY_KIND,
                    build_id=build.build_id,
                    tags=tags,
                    data={"folder": str(folder.path), "vm": name},
                )
            else:
                data = record.data  # an earlier attempt recorded it, and perhaps made part of it
            await asyncio.to_thread(self._prepare, build, folder, base, data, host_key)
            groups = await asyncio.to_thread(cgroups.make_cgroups, name, limits)
            await _add_address(data["address"])
            await self._boot(name, folder, data, groups)
            return self._build_vm(name, data)

    async def delete(self, name: str) -> None:
        """Stop the VM and remove its files, cgroups and address; succeeds if it is already gone."""
        name = _checked_name(name)
        folder = self.folder(name)
        async with file_lock(self._vms / f"{name}.lock"):
            await self.stop(name)
            await asyncio.to_thread(cgroups.remove_cgroups, name)
            for record in await asyncio.to_thread(self._store.list, kind=ADDRESS_KIND):
                if record.data.get("vm") == name:
                    await _delete_address(record.data["address"])
                    await asyncio.to_thread(self._store.forget, record.id)
            await asyncio.to_thread(shutil.rmtree, folder.path, True)
            await asyncio.to_thread(self._store.forget, overlay_id(name))
            await asyncio.to_thread(self._store.forget, vm_id(name))
            (self._vms / f"{name}.lock").unlink(missing_ok=True)

    async def stop(self, name: str) -> None:
        """End every process of the VM by killing its PID 1, and wait until none is left."""
        folder = self.folder(name)
        leader = running(folder)
        if leader is not None:
            pid, namespace = leader
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while await asyncio.to_thread(_namespace_has_processes, namespace):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the processes of VM {name} did not end within {STOP_TIMEOUT_SECONDS:.0f}s")
                await asyncio.sleep(0.02)
        folder.pid_file.unlink(missing_ok=True)

    def _build_vm(self, name: str, data: dict) -> BuildVm:
        return BuildVm(
            name=name,
            host=data["address"],
            port=SSH_PORT,
            admin_user=data["adminUser"],
            host_key=data["hostKey"],
            os_type="Linux",
            resources=[
                Resource(id=vm_id(name), kind=VM_KIND, owner=name),
                Resource(id=overlay_id(name), kind=OVERLAY_KIND, owner=name),
                Resource(id=address_id(data["address"]), kind=ADDRESS_KIND, owner=name),
            ],
        )

    def _claim_address(self, build: BuildContext, name: str, tags: dict[str, str]) -> str:
        """A loopback address derived from the VM name; the store's atomic claim settles a collision."""
        outside_kiln = set(_loopback_addresses())
        for attempt in range(1000):
            digest = hashlib.sha256(f"{name}/{attempt}".encode()).digest()
            # Skips 127.0.x.x, where the host's own services listen.
            address = f"127.{1 + digest[0] % 254}.{digest[1]}.{1 + digest[2] % 254}"
            if address in outside_kiln and self._store.get(address_id(address)) is None:
                continue
            claimed = self._store.claim(
                address_id(address),
                kind=ADDRESS_KIND,
                build_id=build.build_id,
                tags=tags,
                data={"address": address, "vm": name},
            )
            if claimed.data.get("vm") == name:
                return address
        raise RuntimeError("no free loopback address for a VM")

    def _prepare(
        self, build: BuildContext, folder: VmFolder, base: Path, data: dict, host_key: asyncssh.SSHKey
    ) -> None:
        """Lay out the VM's folder and write the build's admin user, keys and host key into its root."""
        for path in (folder.path, folder.work, folder.merged, folder.etc):
            path.mkdir(parents=True, exist_ok=True)
        if data["lower"]:
            folder.upper.mkdir(exist_ok=True)
            layer = _Layer(folder.upper, base)
        else:
            if not any(folder.merged.iterdir()):
                # Where overlayfs cannot stack on the state folder: a full copy (reflinks where possible).
                subprocess.run(["cp", "-a", "--reflink=auto", f"{base}/.", str(folder.merged)], check=True)
            layer = _Layer(folder.merged, None)
        user = data["adminUser"]
        client_key = derive_key(self._secret, build.build_id, "client")
        layer.add_user(user)
        home = f"home/{user}"
        uid, gid = layer.ids_of(user)
        layer.write(
            f"{home}/.ssh/authorized_keys",
            public_line(client_key, "kiln").encode() + b"\n",
            mode=0o600,
            owner=(uid, gid),
            folder_mode=0o700,
        )
        layer.write(f"etc/sudoers.d/90-{user}", f"{user} ALL=(ALL) NOPASSWD:ALL\n".encode(), mode=0o440)
        layer.write("etc/ssh/ssh_host_ed25519_key", private_openssh(host_key), mode=0o600)
        layer.write("etc/ssh/ssh_host_ed25519_key.pub", data["hostKey"].encode() + b"\n", mode=0o644)
        layer.write(f"{GUEST_FILES}/admin-user", f"{user}\n".encode(), mode=0o644)
        hostname = folder.path.name[:63]
        (folder.etc / "hostname").write_text(f"{hostname}\n")
        (folder.etc / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n{data['address']}\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        )
        shutil.copyfile("/etc/resolv.conf", folder.etc / "resolv.conf")

    async def _boot(self, name: str, folder: VmFolder, data: dict, cgroups: list[Path]) -> None:
        folder.boot_script.write_text(_boot_script(name, folder, data, cgroups))
        folder.pid_file.unlink(missing_ok=True)
        with folder.console.open("ab") as console:
            # setsid -f: the VM is no child of this worker and lives on when the worker dies.
            launcher = await asyncio.create_subprocess_exec(
                "setsid",
                "-f",
                "unshare",
                "--mount",
                "--uts",
                "--ipc",
                "--pid",
                "--fork",
                "--propagation",
                "private",
                "sh",
                str(folder.boot_script),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=console,
                stderr=console,
            )
            await launcher.wait()
        deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
        while not await _ssh_ready(data["address"]):
            if time.monotonic() > deadline or (folder.pid_file.exists() and running(folder) is None):
                tail = folder.console.read_text(errors="replace").splitlines()[-20:]
                await self.stop(name)  # a guest that starts late must not answer for a VM made again
                raise RuntimeError(f"VM {name} did not start sshd on {data['address']}:{SSH_PORT}:\n" + "\n".join(tail))
            await asyncio.sleep(0.01)


def _checked_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > 100:
        raise PermanentError(f"'{name}' cannot name a local VM", kind="InvalidName")
    return name


class _Layer:
    """Writes into a VM's writable layer; files it changes start from the base's copy, as overlayfs would."""

    def __init__(self, root: Path, lower: Path | None) -> None:
        self.root = root
        self.lower = lower

    def read(self, relative: str) -> str:
        for top in (self.root, self.lower):
            if top is not None and (top / relative).exists():
                return (top / relative).read_text()
        return ""

    def write(
        self, relative: str, data: bytes, *, mode: int, owner: tuple[int, int] = (0, 0), folder_mode: int = 0o755
    ) -> None:
        self._make_parents(relative, owner, folder_mode)
        target = self.root / relative
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chown(target, *owner)
        os.chmod(target, mode)

    def _make_parents(self, relative: str, owner: tuple[int, int], folder_mode: int) -> None:
        """Folders new to the layer take the base's owner and mode, so the merged view shows them unchanged."""
        parts = Path(relative).parts[:-1]
        for depth in range(1, len(parts) + 1):
            sub = Path(*parts[:depth])
            made = self.root / sub
            if made.is_dir():
                continue
            made.mkdir()
            below = self.lower / sub if self.lower is not None else None
            if below is not None and below.is_dir():
                info = below.stat()
                os.chown(made, info.st_uid, info.st_gid)
                os.chmod(made, info.st_mode & 0o7777)
            else:
                os.chown(made, *owner)
                os.chmod(made, folder_mode)

    def ids_of(self, user: str) -> tuple[int, int]:
        for line in self.read("etc/passwd").splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise KeyError(user)

    def add_user(self, user: str) -> None:
        """Add ``user`` with a group of its own and a home, unless the layer has it already."""
        passwd = self.read("etc/passwd")
        if any(line.split(":")[0] == user for line in passwd.splitlines()):
            return
        group = self.read("etc/group")
        taken = {
            int(line.split(":")[2]) for text in (passwd, group) for line in text.splitlines() if line.count(":") >= 2
        }
        uid = next(i for i in range(1000, 60000) if i not in taken)
        days = int(time.time() // 86400)
        self._append("etc/passwd", f"{user}:x:{uid}:{uid}::/home/{user}:/bin/bash\n")
        self._append("etc/group", f"{user}:x:{uid}:\n")
        # '*' and not '!': no password, yet not a locked account that sshd would refuse.
        self._append("etc/shadow", f"{user}:*:{days}:0:99999:7:::\n")
        self._append("etc/gshadow", f"{user}:!::\n")
        (self.root / "home").mkdir(exist_ok=True)
        home = self.root / "home" / user
        home.mkdir(mode=0o750, exist_ok=True)
        os.chown(home, uid, uid)

    def _append(self, relative: str, line: str) -> None:
        """Append to a system file, keeping the base's mode and owner (shadow is root:shadow 0640)."""
        below = next(
            (top / relative for top in (self.root, self.lower) if top is not None and (top / relative).exists()), None
        )
        if below is None:
            return
        info = below.stat()
        text = self.read(relative)
        if text and not text.endswith("\n"):
            text += "\n"
        self.write(relative, (text + line).encode(), mode=info.st_mode & 0o7777, owner=(info.st_uid, info.st_gid))


def _boot_script(name: str, folder: VmFolder, data: dict, cgroups: list[Path]) -> str:
    """PID 1 of the VM: join its cgroups, mount its root, pivot into it and become its sshd."""
    q = shlex.quote
    root = q(str(folder.merged))
    if data["lower"]:
        mount_root = (
            f"mount -t overlay kiln-{q(name)} -o lowerdir={q(data['lower'])},upperdir={q(str(folder.upper))},"
            f"workdir={q(str(folder.work))} {root}"
        )
    else:
        mount_root = f"mount --bind {root} {root}"  # pivot_root needs a mount point
    join_cgroups = "\n".join(f"echo 0 > {q(str(group / 'cgroup.procs'))}" for group in cgroups)
    make_nodes = "\n".join(
        f"mknod -m 0666 {root}/dev/{node} c {major} {minor}"
        for node, major, minor in (
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        )
    )
    binds = "\n".join(
        f"[ -e {root}/etc/{f} ] || : > {root}/etc/{f}\nmount --bind {q(str(folder.etc / f))} {root}/etc/{f}"
        for f in ("hostname", "hosts", "resolv.conf")
    )
    return f"""set -eu
# The host's view of this process: /proc is still the host's here, so "self" is its host pid.
read -r stat < /proc/self/stat
set -- $stat
echo "$1 ${{22}}" > {q(str(folder.pid_file))}.tmp
mv {q(str(folder.pid_file))}.tmp {q(str(folder.pid_file))}
{join_cgroups}
{mount_root}
mount -t proc -o nosuid,nodev,noexec proc {root}/proc
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {root}/sys
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs {root}/run
mkdir -m 0755 {root}/run/sshd {root}/run/lock
mount -t tmpfs -o mode=0755,nosuid tmpfs {root}/dev
{make_nodes}
mkdir {root}/dev/pts {root}/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts {root}/dev/pts
ln -s pts/ptmx {root}/dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {root}/dev/shm
ln -s /proc/self/fd {root}/dev/fd
ln -s /proc/self/fd/0 {root}/dev/stdin
ln -s /proc/self/fd/1 {root}/dev/stdout
ln -s /proc/self/fd/2 {root}/dev/stderr
{binds}
echo {q(name[:63])} > /proc/sys/kernel/hostname
cd {root}
pivot_root . .
umount -l .
cd /
exec /usr/sbin/sshd -D -e -o ListenAddress={data["address"]}:{SSH_PORT} -o HostKey=/etc/ssh/ssh_host_ed25519_key -o UseDNS=no
"""


def running(folder: VmFolder) -> tuple[int, int] | None:
    """PID 1 of the VM and its PID namespace, if it still runs. The start time in the pid file tells the VM's
    process from an unrelated one that got the same pid later."""
    try:
        pid_text, start_time = folder.pid_file.read_text().split()
        pid = int(pid_text)
        stat = Path(f"/proc/{pid}/stat").read_text()
        namespace = os.stat(f"/proc/{pid}/ns/pid").st_ino
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    state, started = fields[0], fields[19]
    if state in ("Z", "X") or started != start_time:
        return None
    return pid, namespace


def _namespace_has_processes(namespace: int) -> bool:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino == namespace:
                    return True
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return False


async def _ssh_ready(address: str) -> bool:
    """True once sshd accepts a connection and sends its banner."""
    try:
        reader, writer = await asyncio.open_connection(address, SSH_PORT)
    except OSError:
        return False
    try:
        banner = await asyncio.wait_for(reader.readline(), timeout=2)
        return banner.startswith(b"SSH-")
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()


def _loopback_addresses() -> list[str]:
    output = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True, check=True)
    return [line.split()[3].split("/")[0] for line in output.stdout.splitlines()]


async def _add_address(address: str) -> None:
    try:
        await run("ip", "addr", "add", f"{address}/32", "dev", "lo")
    except CommandFailed as err:
        if "File exists" not in err.stderr:
            raise


async def _delete_address(address: str) -> None:
    """Take the address off the loopback device; done when it is not there (a worker that died after removing it
    and before forgetting its record leaves just that). iproute2 words that case differently from one version to
    the next, so the device itself is asked."""
    try:
        await run("ip", "addr", "del", f"{address}/32", "dev", "lo")
    except CommandFailed:
        if address in await asyncio.to_thread(_loopback_addresses):
            raise
