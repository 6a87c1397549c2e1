"""Local build VMs: boot, SSH with pinned keys, detached scripts, deprovision, delete, and surviving their maker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from activities.clouds.aib.names import admin_user_of
from activities.clouds.base import PermanentError
from activities.clouds.local import LocalCloud, cgroups
from activities.clouds.local.host import ssh_answers
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.vm import ProvisioningFailed
from activities.guest import ssh
from activities.guest.keys import derive_key, public_line
from activities.guest.linux import AIB_DEPROVISION, KILN_DEPROVISION
from activities.guest.ssh import open_session
from tests.fixtures import connect, deprovision_script
from tests.local.vms import STAGING, MakeVm, guest_run, new_build, pid_namespace_members, run_to_end
from workflows.models import BuildVm, ResolvedSource, VmSpec

pytestmark = pytest.mark.local


def loopback_addresses() -> str:
    return subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout


def running(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie, killed and not yet reaped by whoever inherited it, does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


async def test_script_runs_as_the_admin_user_and_reports_output_and_exit_code(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    assert vm.port == 22 and vm.host.startswith("127.") and vm.admin_user == admin_user_of(build.build_id)
    async with connect(cloud, build, vm) as guest:
        script = "echo out; echo err >&2; id -un; hostname; pwd; sudo -n id -u; exit 7"
        output, exit_code = await run_to_end(guest, "run-1", script)
    assert exit_code == 7
    assert output.decode().splitlines() == ["out", "err", vm.admin_user, vm.name, f"/home/{vm.admin_user}", "0"]


async def test_a_started_run_id_is_not_started_again(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    async with connect(cloud, build, vm) as guest:
        await run_to_end(guest, "once", "echo ran >> /tmp/count")
        await guest.start_script("once", "echo ran >> /tmp/count")
        output, _ = await run_to_end(guest, "count", "cat /tmp/count")
    assert output == b"ran\n"


async def test_script_outlives_the_connection_and_polls_resume_at_an_offset(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    async with connect(cloud, build, vm) as guest:
        await guest.start_script("long", "echo first; sleep 1; echo second")
        first = await guest.poll_script("long", 0)
    # A new connection, as a worker that took over would make, reads on from where the last one stopped.
    async with connect(cloud, build, vm) as guest:
        offset, rest = len(first.output), b""
        while True:
            progress = await guest.poll_script("long", offset)
            rest += progress.output
            offset += len(progress.output)
            if progress.exit_code is not None:
                break
            await asyncio.sleep(0.1)
    assert first.output + rest == b"first\nsecond\n" and progress.exit_code == 0


async def test_kill_script_stops_its_process_group(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    async with connect(cloud, build, vm) as guest:
        await guest.start_script("sleeper", "sleep 300 & sleep 301; echo never")
        await guest.kill_script("sleeper")  # right away: start_script returns only once the run can be stopped
        progress = await guest.poll_script("sleeper", 0)
        await guest.kill_script("sleeper")  # already ended: nothing to do
    assert progress.exit_code is not None and progress.exit_code != 0
    assert b"never" not in progress.output
    assert "sleep 30" not in await guest_run(cloud, vm.name, "ps -eo args")


async def test_a_frozen_guest_fails_the_command_instead_of_hanging(
    cloud: LocalCloud, make_vm: MakeVm, monkeypatch: pytest.MonkeyPatch
):
    """A guest that stops answering (its sshd frozen here) fails the poll in bounded time; once it answers again,
    a new connection re-attaches to the script, which ran on meanwhile."""
    build, vm = await make_vm()
    monkeypatch.setattr(ssh, "COMMAND_TIMEOUT_SECONDS", 2.0)
    async with connect(cloud, build, vm) as guest:
        await guest.start_script("frozen", "sleep 3; echo survived")
        sshd = [  # the listener and this connection's session processes
            pid
            for pid in pid_namespace_members(cloud.vms.leader(vm.name))
            if Path(f"/proc/{pid}/comm").read_text().startswith("sshd")
        ]
        for pid in sshd:
            os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(RuntimeError, match=r"did not answer a command within 2 s"):
                await guest.poll_script("frozen", 0)
        finally:
            for pid in sshd:
                os.kill(pid, signal.SIGCONT)
    async with connect(cloud, build, vm) as guest:
        output, exit_code = await run_to_end(guest, "frozen", "never started: the run id exists")
    assert (output, exit_code) == (b"survived\n", 0)


async def test_upload_and_path_exists(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    async with connect(cloud, build, vm) as guest:
        assert not await guest.path_exists("/tmp/DeprovisioningScript.sh")
        await guest.upload(b"echo custom\n", "/tmp/DeprovisioningScript.sh", mode=0o755)
        assert await guest.path_exists("/tmp/DeprovisioningScript.sh")
        output, _ = await run_to_end(guest, "ls", "stat -c '%a %U' /tmp/DeprovisioningScript.sh")
    assert output.decode().split() == ["755", vm.admin_user]


async def test_connect_refuses_a_host_key_other_than_the_pinned_one(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    other = public_line(derive_key(b"another secret", build.build_id, "host"))
    session = open_session(
        host=vm.host,
        port=vm.port,
        username=vm.admin_user,
        host_key=other,
        client_key=derive_key(b"another secret", build.build_id, "client"),
    )
    with pytest.raises(PermanentError, match="host key"):
        async with session:
            pass


async def test_create_again_returns_the_running_vm(cloud: LocalCloud, make_vm: MakeVm, debian: ResolvedSource):
    build, vm = await make_vm()
    spec = VmSpec(name=vm.name, purpose="build", image_id=debian.image_id, source=debian, vm_profile={})
    assert await cloud.create_vm(build, STAGING, spec) == vm


async def test_a_vm_whose_provisioning_failed_names_what_failed_and_a_retry_provisions_it_anew(
    cloud: LocalCloud, make_vm: MakeVm, debian: ResolvedSource
):
    build, vm = await make_vm()
    spec = VmSpec(name=vm.name, purpose="build", image_id=debian.image_id, source=debian, vm_profile={})
    # The image's own cloud-init configuration fails the VM's next provisioning: its next boot.
    await guest_run(cloud, vm.name, "printf 'bootcmd: [\"exit 3\"]\\n' > /etc/cloud/cloud.cfg.d/99-broken.cfg")
    await cloud.vms.stop(vm.name)
    with pytest.raises(ProvisioningFailed) as failed:
        await cloud.create_vm(build, STAGING, spec)
    assert f"cloud-init failed to provision VM {vm.name}" in str(failed.value)
    assert "bootcmd" in str(failed.value), str(failed.value)  # the module that failed, not only "status: error"
    # The cause gone, the step's retry finds the VM running with its failed provisioning, and provisions it again.
    await guest_run(cloud, vm.name, "rm /etc/cloud/cloud.cfg.d/99-broken.cfg")
    assert await cloud.create_vm(build, STAGING, spec) == vm
    assert "status: done" in await guest_run(cloud, vm.name, "cloud-init status")


async def test_vm_size_sets_cgroup_limits_clamped_to_the_machine(cloud: LocalCloud, make_vm: MakeVm):
    _, vm = await make_vm(vm_size="Standard_D2s_v3")
    memory = Path(f"/sys/fs/cgroup/memory/kiln/{vm.name}/memory.limit_in_bytes")
    if not memory.exists():
        pytest.skip("this machine has no cgroup v1 memory controller")
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert int(memory.read_text()) == min(8 << 30, machine)
    quota = int(Path(f"/sys/fs/cgroup/cpu/kiln/{vm.name}/cpu.cfs_quota_us").read_text())
    assert quota == min(2, os.cpu_count() or 1) * 100_000
    pid = cloud.vms.leader(vm.name)
    assert f"/kiln/{vm.name}" in Path(f"/proc/{pid}/cgroup").read_text()


async def test_deprovision_is_the_azure_agents_and_deletes_the_user_cloud_init_made(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    async with connect(cloud, build, vm) as guest:
        script = await deprovision_script(guest, vm)
        # The session's own user goes away here; the open session still reads how the script ended.
        output, exit_code = await run_to_end(guest, "deprovision", script, as_root=True)
    assert script == AIB_DEPROVISION  # the image has waagent: AIB's own command, word for word
    assert exit_code == 0, output
    assert f"{vm.admin_user} account and entire home directory will be deleted" in output.decode()
    user = vm.admin_user
    leftovers = await guest_run(
        cloud,
        vm.name,
        f"getent passwd {user} > /dev/null && echo user; [ -e /home/{user} ] && echo home;"
        " ls /etc/ssh/ssh_host_* > /dev/null 2>&1 && echo host-keys; [ -e /var/lib/waagent/ovf-env.xml ] && echo ovf;"
        " getent shadow root | grep -q ':\\*LOCK\\*:' || echo root-password; echo checked",
    )
    assert leftovers == "checked\n"


async def test_where_the_image_has_no_agent_kilns_deprovision_does_its_work(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    async with connect(cloud, build, vm) as guest:
        await run_to_end(guest, "dirty", "echo x > /tmp/junk; sudo sh -c 'echo log > /var/log/custom.log'")
        script = f"set -- {vm.admin_user}\n{KILN_DEPROVISION}"
        output, exit_code = await run_to_end(guest, "deprovision", script, as_root=True)
    assert exit_code == 0, output
    user = vm.admin_user
    leftovers = await guest_run(
        cloud,
        vm.name,
        f"getent passwd {user} > /dev/null && echo user; [ -e /home/{user} ] && echo home;"
        " ls /etc/ssh/ssh_host_* > /dev/null 2>&1 && echo host-keys;"
        " [ -s /etc/machine-id ] && echo machine-id; [ -e /tmp/junk ] && echo tmp;"
        " find /var/log -type f | grep -q . && echo logs; echo checked",
    )
    assert leftovers == "checked\n"


async def test_delete_leaves_no_process_mount_folder_address_or_record(
    cloud: LocalCloud, store: ResourceStore, debian: ResolvedSource
):
    build = new_build()
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=debian.image_id, source=debian, vm_profile={}
    )
    vm = await cloud.create_vm(build, STAGING, spec)
    try:
        folder = cloud.vms.folder(vm.name).path
        members = pid_namespace_members(cloud.vms.leader(vm.name))
        helpers = cgroups.processes(vm.name)  # the supervisor, nspawn and slirp4netns too
        assert (
            members
            and helpers
            and {r.kind for r in store.list(build_id=build.build_id)}
            == {
                "vm",
                "overlay",
                "address",
            }
        )
        assert await ssh_answers(vm.host, vm.port)
    finally:
        await cloud.delete_vm(build, vm.name)

    assert not any(running(pid) for pid in {*members, *helpers})
    assert str(folder) not in Path("/proc/self/mountinfo").read_text()
    assert not folder.exists()
    assert not await ssh_answers(vm.host, vm.port)
    assert not Path(f"/sys/fs/cgroup/memory/kiln/{vm.name}").exists()
    assert store.list(build_id=build.build_id) == []
    await cloud.delete_vm(build, vm.name)  # already gone: succeeds


async def test_vm_outlives_the_process_that_made_it(cloud: LocalCloud, state: Path, debian: ResolvedSource):
    build = new_build()
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=debian.image_id, source=debian, vm_profile={}
    )
    maker = f"""
import asyncio, sys
from pathlib import Path
from activities.clouds.local import LocalCloud, cgroups
from activities.clouds.local.host import ssh_answers
from activities.clouds.local.records import ResourceStore
from workflows.models import BuildContext, Staging, VmSpec
cloud = LocalCloud(storage=None, store=ResourceStore(Path({str(state / "resources.db")!r})), state=Path({str(state)!r}))
vm = asyncio.run(cloud.create_vm(BuildContext.model_validate_json(sys.argv[1]),
                 Staging.model_validate_json(sys.argv[2]), VmSpec.model_validate_json(sys.argv[3])))
print(vm.model_dump_json())
"""
    made = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        maker,
        build.model_dump_json(),
        STAGING.model_dump_json(),
        spec.model_dump_json(),
        cwd=Path(__file__).parents[2],
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await made.communicate()
    assert made.returncode == 0
    vm = BuildVm.model_validate(json.loads(stdout))
    try:
        async with connect(cloud, build, vm) as guest:
            output, exit_code = await run_to_end(guest, "alive", "echo still here")
        assert (output, exit_code) == (b"still here\n", 0)
    finally:
        await cloud.delete_vm(build, vm.name)


async def test_an_image_that_cannot_boot_fails_the_create_at_once_naming_the_packages(
    cloud: LocalCloud, tmp_path: Path
):
    build = new_build()
    source = ResolvedSource(image_id="bare", exact_version="1")
    spec = VmSpec(name=f"{build.build_id}-build", purpose="build", image_id="bare", source=source, vm_profile={})
    (tmp_path / "usr" / "sbin").mkdir(parents=True)
    with pytest.raises(PermanentError) as refused:
        await cloud.vms.create(build, spec, tmp_path)
    assert refused.value.type == "GuestNotBootable"
    assert "openssh-server" in refused.value.message and "(Debian package systemd)" in refused.value.message
    folder = cloud.vms.folder(spec.name).path
    assert list(folder.parent.glob(f"{spec.name}*")) == []  # refused before anything was made: no folder, no lock


async def test_a_missing_host_program_fails_the_create_at_once_naming_it(
    cloud: LocalCloud, debian: ResolvedSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A PATH with every program of the machine but slirp4netns, as on a host without its package.
    for folder in os.environ["PATH"].split(os.pathsep):
        for program in Path(folder).glob("*") if Path(folder).is_dir() else []:
            if program.name != "slirp4netns" and not (tmp_path / program.name).exists():
                (tmp_path / program.name).symlink_to(program)
    monkeypatch.setenv("PATH", str(tmp_path))
    build = new_build()
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=debian.image_id, source=debian, vm_profile={}
    )
    with pytest.raises(PermanentError) as refused:
        await cloud.create_vm(build, STAGING, spec)
    assert refused.value.type == "HostProgramMissing"
    assert "slirp4netns (Debian package slirp4netns)" in refused.value.message
    assert list(cloud.vms.folder(spec.name).path.parent.glob(f"{spec.name}*")) == []  # nothing made
