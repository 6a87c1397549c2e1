"""Local build VMs: real systemd machines, made from a base or an earlier build's image in about two seconds.

A VM is its image's root filesystem on a copy-on-write overlay (the image below, the VM's own layer above),
booted by systemd-nspawn with systemd as PID 1, in mount and network namespaces of its own: services a
customizer starts answer on the VM's own localhost. Its network is user-mode (slirp4netns): the VM reaches out
as a machine behind NAT does, cannot reach the host's own services, and its sshd is forwarded to a loopback
address of its own (127.x.y.z), so nothing is added to the host's network. cloud-init provisions it from a
NoCloud seed, as Azure provisions a VM from its osProfile: the admin user with its key and passwordless sudo,
and the SSH host key kiln pins before the VM boots. ``/var/lib/waagent/ovf-env.xml`` names the admin user, as
Azure's provisioning leaves it, so the Azure agent's ``-deprovision+user`` deletes that user for real. vmSize
becomes cgroup limits; its data disks are loop devices (``data_disks.py``).

A VM runs under a supervisor started detached (``setsid``), so it outlives the worker that made it; its records
(made before anything else), folder and cgroups let any worker find, stop and delete it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
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
from activities.clouds.local.data_disks import DataDisk, DataDisks, azure_disk_names, guest_device
from activities.clouds.local.host import file_lock, require_programs, ssh_answers, to_the_end
from activities.clouds.local.overlays import VmLayers, overlay_works
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.sizes import VmLimits, limits_for
from activities.guest.keys import derive_key, private_openssh, public_line
from activities.guest.ssh import Completed, ShellSession
from workflows.models import BuildContext, BuildVm, Resource, VmSpec

VM_KIND = "vm"
ADDRESS_KIND = "address"
OVERLAY_KIND = "overlay"
SSH_PORT = 22
BOOT_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
# The host programs a VM runs on, by Debian package.
VM_PROGRAMS = {
    "systemd-nspawn": "systemd-container",
    "slirp4netns": "slirp4netns",
    "unshare": "util-linux",
    "setsid": "util-linux",
    "nsenter": "util-linux",
    "mount": "mount",
    "ip": "iproute2",
    "losetup": "mount",
    "delpart": "util-linux",
}
# What an image must hold to boot as a build VM.
IMAGE_NEEDS = {"lib/systemd/systemd": "systemd", "usr/bin/cloud-init": "cloud-init", "usr/sbin/sshd": "openssh-server"}


def vm_id(name: str) -> str:
    return f"kiln-local/{VM_KIND}/{name}"


def overlay_id(name: str) -> str:
    return f"kiln-local/{OVERLAY_KIND}/{name}"


def address_id(address: str) -> str:
    return f"kiln-local/{ADDRESS_KIND}/{address}"


class ProvisioningFailed(RuntimeError):
    """cloud-init reported an error. Retryable: the next attempt boots the VM again, and it is provisioned anew."""


@dataclass(frozen=True)
class VmFolder:
    """Where one VM's files live: its layer, the overlay's work folder and mount point, its seed, its run files."""

    path: Path

    def __getattr__(self, name: str) -> Path:
        files = {
            "upper": "upper",
            "work": "work",
            "merged": "merged",
            "seed": "seed",
            "resolved": "resolved.conf",
            "supervisor": "supervisor.sh",
            "inner": "inner.sh",
            "supervisor_pid": "supervisor.pid",
            "nspawn_pid": "nspawn.pid",
            "console": "console.log",
            "slirp_socket": "slirp.sock",
            "in_namespaces": "ns.ready",
            "network_ready": "net.ready",
            "disks": "disks",
        }
        if name not in files:
            raise AttributeError(name)
        return self.path / files[name]


class LocalVms:
    """Create, stop and delete local build VMs; every worker on the machine shares their records."""

    def __init__(self, *, state: Path, store: ResourceStore, secret: bytes) -> None:
        self._vms = state / "vms"
        self._store = store
        self._secret = secret
        self.data_disks = DataDisks(store)

    def folder(self, name: str) -> VmFolder:
        return VmFolder(self._vms / name)

    async def layers(self, name: str) -> VmLayers:
        """The VM's own layer (its whole root on a copy) and the image below it."""
        record = await asyncio.to_thread(self._store.get, vm_id(name))
        if record is None:
            raise PermanentError(f"there is no local VM named {name}", kind="VmNotFound")
        lower = record.data["lower"]
        folder = self.folder(name)
        return VmLayers(root=folder.upper if lower else folder.merged, lower=Path(lower) if lower else None)

    def runs_on(self, image: Path) -> bool:
        """Whether a VM has ``image`` as the lower layer of its overlay (so the image must stay)."""
        return any(record.data.get("lower") == str(image) for record in self._store.list(kind=VM_KIND))

    async def create(self, build: BuildContext, spec: VmSpec, image: Path, disks: Sequence[DataDisk] = ()) -> BuildVm:
        """Boot a VM of ``image`` with ``disks`` and wait until it is provisioned, or return the one a previous
        attempt of this create made (create-or-get).

        Raises:
            PermanentError: a host program or what the image needs to boot is missing (nothing is made then).
        """
        name = _checked_name(spec.name)
        limits = limits_for(spec.vm_profile.vm_size, spec.source.hyper_v_generation)
        folder = self.folder(name)
        # Before the lock, whose file is the first thing a create makes.
        require_programs(VM_PROGRAMS, needed_by=f"booting VM {name}")
        missing = [
            f"/{path} (Debian package {package})"
            for path, package in IMAGE_NEEDS.items()
            if not (image / path).exists()
        ]
        if missing:
            raise PermanentError(
                f"VM {name} cannot boot: its image {image} has no {', '.join(missing)}", kind="GuestNotBootable"
            )
        async with file_lock(self._vms / f"{name}.lock"):
            record = await asyncio.to_thread(self._store.get, vm_id(name))
            if record is not None and self._running(folder):
                try:
                    await self._ready(name, folder, record.data)
                    return self._build_vm(name, record.data)
                except ProvisioningFailed:
                    pass  # an earlier attempt's: a retry boots the VM again, as a new instance, to provision afresh
            tags = kiln_tags(build.build_id, role=ROLE_TEMPORARY, extra=build.managed_resource_tags)
            if record is None:
                data = {
                    "address": await asyncio.to_thread(claim_address, self._store, build, name, tags),
                    "port": SSH_PORT,
                    "adminUser": admin_user_of(build.build_id),
                    "hostKey": public_line(derive_key(self._secret, build.build_id, "host")),
                    "folder": str(folder.path),
                    "hyperVGeneration": spec.source.hyper_v_generation,
                    "sourceBytes": spec.source.size_bytes,
                    "vmSize": limits.size,
                    "lower": str(image) if await overlay_works(image, self._vms) else None,
                    "dataDisks": len(disks),
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
                await self._kill(name, folder)  # whatever of it still runs without answering
            await to_the_end(self._launch(build, name, folder, image, data, limits, disks, tags))
            await self._ready(name, folder, data)
            return self._build_vm(name, data)

    async def delete(self, name: str) -> None:
        """Stop the VM for good and remove its files, cgroups and records; succeeds if it is already gone."""
        name = _checked_name(name)
        folder = self.folder(name)
        async with file_lock(self._vms / f"{name}.lock"):
            await self._kill(name, folder)
            await self.data_disks.delete(name)
            await asyncio.to_thread(cgroups.remove_cgroups, name)
            for record in await asyncio.to_thread(self._store.list, kind=ADDRESS_KIND):
                if record.data.get("vm") == name:
                    await asyncio.to_thread(self._store.forget, record.id)
            await asyncio.to_thread(shutil.rmtree, folder.path, True)
            await asyncio.to_thread(self._store.forget, overlay_id(name))
            await asyncio.to_thread(self._store.forget, vm_id(name))
            (self._vms / f"{name}.lock").unlink(missing_ok=True)

    async def stop(self, name: str) -> None:
        """Power the VM off as a machine shuts down (its journal flushed, its files synced), make sure nothing of
        it runs, and detach its data disks: what a capture of its disks needs."""
        folder = self.folder(name)
        nspawn = live_pid(folder.nspawn_pid)
        if nspawn is not None:
            with suppress(ProcessLookupError):  # it may end between the look and the kill
                os.kill(nspawn, signal.SIGTERM)  # nspawn asks the container's systemd to power off
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while self._running(folder) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await self._kill(name, folder)
        await self.data_disks.detach(name)

    def leader(self, name: str) -> int:
        """The host pid of the VM's PID 1 (its systemd), to enter its namespaces from the host.

        Raises:
            PermanentError: the VM is not running.
        """
        nspawn = live_pid(self.folder(name).nspawn_pid)
        for child in _children(nspawn) if nspawn is not None else []:
            # nspawn's first children set the container up from the host's namespaces; PID 1 has one of its own.
            if _pid_namespace(child) not in (None, _pid_namespace(nspawn)):
                return child
        raise PermanentError(f"local VM {name} is not running", kind="VmNotRunning")

    def session(self, name: str) -> NamespaceSession:
        """A root session in the VM through its own namespaces: no login, so it works after deprovision.

        Raises:
            PermanentError: the VM is not running.
        """
        return NamespaceSession(self.leader(name))

    async def _kill(self, name: str, folder: VmFolder) -> None:
        """End every process of the VM: its PID 1 first (which ends all of the guest's), then all its cgroups list
        and what its pid files name (where it has no cgroups)."""
        nspawn = live_pid(folder.nspawn_pid)
        victims = [*(_children(nspawn) if nspawn is not None else []), nspawn, live_pid(folder.supervisor_pid)]
        for pid in victims:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        await asyncio.to_thread(cgroups.kill_all, name)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while self._running(folder):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the processes of VM {name} did not end within {STOP_TIMEOUT_SECONDS:.0f}s")
            await asyncio.sleep(0.02)
        for pid_file in (folder.supervisor_pid, folder.nspawn_pid):
            pid_file.unlink(missing_ok=True)

    def _running(self, folder: VmFolder) -> bool:
        return any(live_pid(pid_file) is not None for pid_file in (folder.supervisor_pid, folder.nspawn_pid))

    def _build_vm(self, name: str, data: dict) -> BuildVm:
        return BuildVm(
            name=name,
            host=data["address"],
            port=data["port"],
            admin_user=data["adminUser"],
            host_key=data["hostKey"],
            os_type="Linux",
            resources=[
                Resource(id=vm_id(name), kind=VM_KIND, owner=name),
                Resource(id=overlay_id(name), kind=OVERLAY_KIND, owner=name),
                Resource(id=address_id(data["address"]), kind=ADDRESS_KIND, owner=name),
                *self.data_disks.resources(name, data.get("dataDisks", 0)),
            ],
        )

    def _prepare(self, build: BuildContext, folder: VmFolder, image: Path, data: dict) -> None:
        """Lay out the VM's folder: its layer, the seed cloud-init provisions it from, and its run scripts."""
        for path in (folder.path, folder.work, folder.merged, folder.seed):
            path.mkdir(parents=True, exist_ok=True)
        if data["lower"]:
            folder.upper.mkdir(exist_ok=True)
            layer = folder.upper
        else:
            if not any(folder.merged.iterdir()):
                # Where overlayfs cannot stack on the state folder: a whole copy (reflinks where possible).
                subprocess.run(["cp", "-a", "--reflink=auto", f"{image}/.", str(folder.merged)], check=True)
            layer = folder.merged
        user = data["adminUser"]
        hostname = folder.path.name[:63]
        host_key = derive_key(self._secret, build.build_id, "host")
        client_key = derive_key(self._secret, build.build_id, "client")
        devices = [guest_device(lun) for lun in range(data.get("dataDisks", 0))]
        config = cloud_config(user, public_line(client_key, "kiln"), host_key, data_disks=devices)
        (folder.seed / "user-data").write_text("#cloud-config\n" + json.dumps(config, indent=1))
        # A new instance id for every boot from the seed: cloud-init provisions the VM again.
        instance = {"instance-id": f"{hostname}-{uuid.uuid4().hex[:12]}", "local-hostname": hostname}
        (folder.seed / "meta-data").write_text(json.dumps(instance) + "\n")
        waagent = layer / "var/lib/waagent"
        waagent.mkdir(parents=True, exist_ok=True)
        ovf = waagent / "ovf-env.xml"
        ovf.write_text(_OVF_ENV.format(hostname=hostname, user=user))
        ovf.chmod(0o600)
        # The VM's DNS is slirp4netns's forwarder, given to systemd-resolved in the VM's /run, not in its image.
        folder.resolved.write_text("[Resolve]\nDNS=10.0.2.3\n")
        for path in (folder.in_namespaces, folder.network_ready, folder.slirp_socket):
            path.unlink(missing_ok=True)

    async def _launch(
        self,
        build: BuildContext,
        name: str,
        folder: VmFolder,
        image: Path,
        data: dict,
        limits: VmLimits,
        disks: Sequence[DataDisk],
        tags: dict[str, str],
    ) -> None:
        """Lay out the VM's folder, data disks and cgroups and start its supervisor: all of it, or (the worker
        dying) none."""
        await asyncio.to_thread(self._prepare, build, folder, image, data)
        devices = await self.data_disks.attach(build, name, folder.disks, list(disks), tags)
        groups = await asyncio.to_thread(cgroups.make_cgroups, name, limits)
        await self._boot(name, folder, data, groups, devices)

    async def _boot(self, name: str, folder: VmFolder, data: dict, groups: list[Path], devices: list[str]) -> None:
        folder.inner.write_text(_inner_script(name, folder, data, devices))
        folder.supervisor.write_text(_supervisor_script(folder, groups))
        with folder.console.open("ab") as console:
            # setsid -f: the VM is no child of this worker and lives on when the worker dies.
            launcher = await asyncio.create_subprocess_exec(
                "setsid", "-f", "sh", str(folder.supervisor),
                stdin=asyncio.subprocess.DEVNULL, stdout=console, stderr=console,
            )  # fmt: skip
            await launcher.wait()
        deadline = time.monotonic() + 5
        while live_pid(folder.supervisor_pid) is None:  # setsid -f returns before the supervisor has begun
            if time.monotonic() > deadline:
                raise RuntimeError(f"the supervisor of VM {name} did not start: {folder.console.read_text()[-2000:]}")
            await asyncio.sleep(0.01)

    async def _ready(self, name: str, folder: VmFolder, data: dict) -> None:
        """Forward the VM's sshd to its address, wait for it, then for cloud-init to finish provisioning (its later
        stages configure apt, which a first customizer's apt would race)."""
        deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
        while not folder.slirp_socket.exists():
            self._check_boot(name, folder, deadline, "its network")
            await asyncio.sleep(0.02)
        await _forward(folder.slirp_socket, data["address"], data["port"])
        while not await ssh_answers(data["address"], data["port"]):
            self._check_boot(name, folder, deadline, f"sshd on {data['address']}:{data['port']}")
            await asyncio.sleep(0.02)
        waiting = await asyncio.create_subprocess_exec(
            "nsenter", "-t", str(self.leader(name)), "-a", "cloud-init", "status", "--wait", "--long",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await waiting.communicate()
        if waiting.returncode == 1:  # 2 is "degraded": provisioned, with warnings
            # --long names the modules that failed and why; the dots are --wait's progress.
            report = output.decode(errors="replace").lstrip(".").strip()
            raise ProvisioningFailed(f"cloud-init failed to provision VM {name}:\n{report}")

    def _check_boot(self, name: str, folder: VmFolder, deadline: float, waiting_for: str) -> None:
        if time.monotonic() < deadline and self._running(folder):
            return
        tail = folder.console.read_text(errors="replace").splitlines()[-20:] if folder.console.exists() else []
        why = (
            "stopped"
            if not self._running(folder)
            else f"did not start {waiting_for} within {BOOT_TIMEOUT_SECONDS:.0f}s"
        )
        raise RuntimeError(f"VM {name} {why}; its console's last lines:\n" + "\n".join(tail))


class NamespaceSession(ShellSession):
    """Commands run as root in a local VM by entering the namespaces of its PID 1 from the host."""

    def __init__(self, leader: int) -> None:
        super().__init__("root")
        self._leader = leader

    async def command(self, command: str, *, stdin: bytes | None) -> Completed:
        process = await asyncio.create_subprocess_exec(
            "nsenter", "-t", str(self._leader), "-a", "sh", "-c", command,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await process.communicate(stdin or b"")
        return Completed(process.returncode if process.returncode is not None else -1, stdout, stderr)


def claim_address(store: ResourceStore, build: BuildContext, name: str, tags: dict[str, str]) -> str:
    """A loopback address for VM ``name``, derived from the name; the store's atomic claim settles a collision.
    Every 127.0.0.0/8 address is the host's already, so it needs no setting up, only to be nobody else's."""
    for attempt in range(1000):
        digest = hashlib.sha256(f"{name}/{attempt}".encode()).digest()
        # Skips 127.0.x.x, where the host's own services listen.
        address = f"127.{1 + digest[0] % 254}.{digest[1]}.{1 + digest[2] % 254}"
        claimed = store.claim(
            address_id(address),
            kind=ADDRESS_KIND,
            build_id=build.build_id,
            tags=tags,
            data={"address": address, "vm": name},
        )
        if claimed.data.get("vm") == name:
            return address
    raise RuntimeError(f"no free loopback address for VM {name}")


def cloud_config(user: str, login_key: str, host_key, *, data_disks: Sequence[str] = ()) -> dict:
    """What Azure's provisioning gives a Linux VM, as cloud-config: the admin user, its key, sudo, the host key, and
    the names Azure gives its ``data_disks`` (their devices in the VM, by LUN)."""
    config = {
        "users": [
            {
                "name": user,
                "shell": "/bin/bash",
                "lock_passwd": True,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "ssh_authorized_keys": [login_key],
            }
        ],
        "ssh_keys": {"ed25519_private": private_openssh(host_key).decode(), "ed25519_public": public_line(host_key)},
        # Only the pinned key: cloud-init makes none of another type (and, as of cloud-init 25, [] is refused).
        "ssh_genkeytypes": ["ed25519"],
        "ssh_deletekeys": True,
        "ssh_pwauth": False,
        "disable_root": True,
    }
    if data_disks:
        config["bootcmd"] = azure_disk_names(list(data_disks))
    return config


# The least of Azure's provisioning file that waagent reads the admin user from (waagent 2.7 and later).
_OVF_ENV = """<?xml version="1.0" encoding="utf-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" xmlns:wa="http://schemas.microsoft.com/windowsazure">
 <wa:ProvisioningSection>
  <wa:Version>1.0</wa:Version>
  <LinuxProvisioningConfigurationSet xmlns="http://schemas.microsoft.com/windowsazure">
   <ConfigurationSetType>LinuxProvisioningConfiguration</ConfigurationSetType>
   <HostName>{hostname}</HostName>
   <UserName>{user}</UserName>
   <DisableSshPasswordAuthentication>true</DisableSshPasswordAuthentication>
  </LinuxProvisioningConfigurationSet>
 </wa:ProvisioningSection>
 <wa:PlatformSettingsSection>
  <PlatformSettings xmlns="http://schemas.microsoft.com/windowsazure">
   <ProvisionGuestAgent>true</ProvisionGuestAgent>
  </PlatformSettings>
 </wa:PlatformSettingsSection>
</Environment>
"""


def _supervisor_script(folder: VmFolder, groups: list[Path]) -> str:
    """The VM's supervisor, in a session of its own: it starts the VM's namespaces and their network, then waits
    for the VM to end and stops the network with it."""
    q = shlex.quote
    return f"""set -u
{record_pid(folder.supervisor_pid)}
{cgroups.join_command(groups)}
unshare --mount --net --propagation private sh {q(str(folder.inner))} &
vm=$!
echo "$vm $(cut -d' ' -f22 /proc/$vm/stat)" > {q(str(folder.nspawn_pid))}
waited=0
until [ -e {q(str(folder.in_namespaces))} ]; do
  [ "$waited" -lt 1000 ] || {{ kill -KILL "$vm"; exit 1; }}
  sleep 0.01; waited=$((waited + 1))
done
# slirp4netns must join the VM's network namespace, never the host's (it would give the host a tap0 and a route).
[ "$(readlink /proc/$vm/ns/net)" != "$(readlink /proc/self/ns/net)" ] || {{ kill -KILL "$vm"; exit 1; }}
slirp4netns --configure --mtu=65520 --disable-host-loopback --api-socket {q(str(folder.slirp_socket))} \\
  "$vm" tap0 > {q(str(folder.path / "slirp.log"))} 2>&1 &
slirp=$!
waited=0
until [ -S {q(str(folder.slirp_socket))} ]; do
  [ "$waited" -lt 1000 ] || {{ kill -KILL "$vm" "$slirp"; exit 1; }}
  sleep 0.01; waited=$((waited + 1))
done
: > {q(str(folder.network_ready))}
wait "$vm"
kill "$slirp" 2> /dev/null
wait "$slirp"
rm -f {q(str(folder.supervisor_pid))} {q(str(folder.nspawn_pid))} {q(str(folder.slirp_socket))}
"""


def record_pid(pid_file: Path) -> str:
    """Shell lines that write the running shell's pid and start time to ``pid_file`` (what ``live_pid`` reads):
    a pid alone could name a later, unrelated process once the first has ended."""
    return f"""read -r stat < /proc/self/stat
set -- $stat
echo "$1 ${{22}}" > {shlex.quote(str(pid_file))}"""


def _inner_script(name: str, folder: VmFolder, data: dict, devices: list[str]) -> str:
    """Runs in the VM's new mount and network namespaces and becomes systemd-nspawn: systemd as the VM's PID 1, with
    the loop device of each data disk (``devices``, by LUN) as its block device."""
    q = shlex.quote
    disks = "".join(f"  --bind={q(device)}:{guest_device(lun)} \\\n" for lun, device in enumerate(devices))
    root = q(str(folder.merged))
    if data["lower"]:
        mount_root = (
            f"mount -t overlay kiln-{q(name)} -o lowerdir={q(data['lower'])},upperdir={q(str(folder.upper))},"
            f"workdir={q(str(folder.work))} {root}"
        )
    else:
        mount_root = ":"  # a whole copy of the image is the root already
    # Arguments after the folder go to systemd, which (like cloud-init) reads PID 1's as the kernel's command line:
    # network-config=disabled keeps cloud-init off tap0, which slirp4netns configures.
    return f"""set -eu
: > {q(str(folder.in_namespaces))}
ip link set lo up
until [ -e {q(str(folder.network_ready))} ]; do sleep 0.01; done
{mount_root}
exec systemd-nspawn --quiet --directory={root} --boot --register=no --keep-unit --console=pipe \\
  --machine={q(name[:63])} --resolv-conf=off \\
  --bind-ro={q(str(folder.resolved))}:/run/systemd/resolved.conf.d/90-kiln.conf \\
  --bind-ro={q(str(folder.seed))}:/var/lib/cloud/seed/nocloud \\
{disks}  network-config=disabled < /dev/null
"""


async def _forward(socket_path: Path, address: str, port: int) -> None:
    """Forward ``address:port`` on the host to the VM's sshd through slirp4netns's API, unless an earlier attempt
    of this create already has."""
    listed = await _slirp_call(socket_path, {"execute": "list_hostfwd"})
    entries = listed.get("entries") or []
    if any(e.get("host_addr") == address and e.get("host_port") == port for e in entries):
        return
    request = {
        "execute": "add_hostfwd",
        "arguments": {"proto": "tcp", "host_addr": address, "host_port": port, "guest_port": SSH_PORT},
    }
    if error := (await _slirp_call(socket_path, request)).get("error"):
        raise RuntimeError(f"could not forward {address}:{port} to the VM's sshd: {error}")


async def _slirp_call(socket_path: Path, request: dict) -> dict:
    """One request to slirp4netns's API socket (one per connection) and its answer."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        writer.write(json.dumps(request).encode())
        await writer.drain()
        return json.loads(await reader.read(65536) or b"{}")
    finally:
        writer.close()


def live_pid(pid_file: Path) -> int | None:
    """The pid a ``<pid> <start time>`` file names, if that very process still runs (not a later one reusing
    its pid)."""
    try:
        pid_text, start_time = pid_file.read_text().split()
        stat = Path(f"/proc/{int(pid_text)}/stat").read_text()
    except (FileNotFoundError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X") or fields[19] != start_time:
        return None
    return int(pid_text)


def _pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _checked_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > 100:
        raise PermanentError(f"'{name}' cannot name a local VM", kind="InvalidName")
    return name
