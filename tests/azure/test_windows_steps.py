"""Each Windows step as its activity runs it (``ActivityEnvironment``), on a Windows VM the Azure cloud made in the
ARM emulator: a scripted Windows machine reached over WinRM/HTTPS, its logs in Azurite. Seconds each, not minutes:
the machine's clock is scripted and kiln's pauses between checks are short."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from rich.console import Console
from temporalio.testing import ActivityEnvironment

from activities.clouds.aib.ids import platform_image_id
from activities.clouds.azure import AzureCloud
from activities.clouds.base import PermanentError
from activities.customize import CustomizeActivities
from activities.generalize import GeneralizeActivities
from activities.guest import Guests as OsProfiles
from cli.progress import BuildView, EventPrinter, LogTail, read_new_lines
from tests.arm_emulator import ArmEmulator
from tests.azure.environment import LOCATION, SUB, Guests, os_profiles
from tests.azure.test_azure_cloud import build_context
from tests.wsman import GENERALIZED, MachineSettings, Update, WindowsMachine
from workflows.models import (
    Artifact,
    BuildContext,
    BuildStatus,
    BuildVm,
    GuestScriptRequest,
    GuestScriptResult,
    ResolvedSource,
    Staging,
    StepRecord,
    VmSpec,
)
from workflows.template import (
    FileCustomizer,
    PowerShellCustomizer,
    VmProfile,
    WindowsRestartCustomizer,
    WindowsUpdateCustomizer,
)

WINDOWS = ResolvedSource(
    image_id=platform_image_id(
        SUB, LOCATION, "MicrosoftWindowsServer", "WindowsServer", "2022-datacenter-azure-edition", "20348.2227.240104"
    ),
    exact_version="20348.2227.240104",
    os_type="Windows",
    hyper_v_generation="V2",
)
CUMULATIVE = [
    Update(kb="KB5034439", title="2024-01 Servicing Stack Update (KB5034439)", wave=1),
    Update(kb="KB5034770", title="2024-02 Cumulative Update for Windows Server 2022 (KB5034770)", wave=2),
    Update(kb="KB5035857", title="2024-03 Cumulative Update Preview for Windows Server 2022 (KB5035857)", wave=2),
    Update(kb="KB890830", title="Windows Malicious Software Removal Tool x64 (KB890830)", wave=3),
]


@dataclass
class WindowsVm:
    """A build VM the Azure cloud made from a Windows image, and its machine."""

    cloud: AzureCloud
    build: BuildContext
    staging: Staging
    vm: BuildVm
    machine: WindowsMachine

    def request(self, step: Any, *, index: int = 1, staged: list | None = None) -> GuestScriptRequest:
        return GuestScriptRequest(
            build=self.build,
            staging=self.staging,
            vm=self.vm,
            index=index,
            label=f"customize {index + 1}/9: {step.name or step.type}",
            step=step,
            staged=staged or [],
        )

    async def stage(self, data: bytes, field: str = "properties.customize[1].sourceUri") -> Any:
        artifact = Artifact(
            source_uri="https://example.invalid/file", sha256=hashlib.sha256(data).hexdigest(), field=field
        )
        return await self.cloud.stage_artifact(self.build, self.staging, artifact, data)

    async def log(self) -> str:
        sink = await self.cloud.open_log(self.build, self.staging, "customization.log")
        return (await sink.read()).decode()


@pytest_asyncio.fixture
async def windows_vm(
    cloud: AzureCloud, arm: ArmEmulator, guests: Guests
) -> AsyncIterator[Callable[..., Awaitable[WindowsVm]]]:
    made: list[WindowsVm] = []

    async def make(settings: MachineSettings | None = None) -> WindowsVm:
        guests.attach(arm)
        guests.windows = lambda spec: settings or MachineSettings()
        build = build_context()
        staging = await cloud.create_staging(build)
        spec = VmSpec(
            name=f"{build.build_id}-build",
            purpose="build",
            image_id=WINDOWS.image_id,
            source=WINDOWS,
            vm_profile=VmProfile(),
        )
        vm = await cloud.create_vm(build, staging, spec)
        made.append(WindowsVm(cloud, build, staging, vm, guests.machines[spec.name]))
        return made[-1]

    yield make
    for one in made:
        await cloud.delete_vm(one.build, one.vm.name)
        await cloud.delete_staging(one.build)


async def customize(
    vm: WindowsVm,
    step: Any,
    *,
    profiles: OsProfiles | None = None,
    env: ActivityEnvironment | None = None,
    **request: Any,
) -> GuestScriptResult:
    activities = CustomizeActivities(vm.cloud, profiles or os_profiles())
    return await (env or ActivityEnvironment()).run(activities.run_customizer, vm.request(step, **request))


def powershell(*inline: str, **fields: Any) -> PowerShellCustomizer:
    return PowerShellCustomizer(type="PowerShell", name=fields.pop("name", "script"), inline=list(inline), **fields)


async def test_valid_exit_codes_judge_a_powershell_step(windows_vm: Callable[..., Awaitable[WindowsVm]]) -> None:
    vm = await windows_vm()
    result = await customize(vm, powershell("Write-Host reboot needed later", "exit 3010", valid_exit_codes=[0, 3010]))
    assert result.exit_code == 3010
    with pytest.raises(PermanentError) as failed:
        await customize(vm, powershell("Write-Host about to fail", "exit 3", name="strict"), index=2)
    assert failed.value.type == "CustomizerFailed"
    assert "customize 3/9: strict failed with exit code 3" in failed.value.message
    assert "about to fail" in failed.value.message
    log = await vm.log()
    assert "==> azure-arm: customize 2/9: script: exit code 3010" in log and "reboot needed later" in log


async def test_a_failing_statement_fails_an_inline_step_as_packer_runs_it(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    """Inline lines run inside try, as Packer's powershell provisioner runs them: an unknown command ends the script
    with exit code 1, and what came after it never runs."""
    vm = await windows_vm()
    with pytest.raises(PermanentError, match="exit code 1"):
        await customize(vm, powershell("Write-Host first", "Install-Nothing -Now", "Write-Host never"))
    log = await vm.log()
    assert "An error occurred: The term 'Install-Nothing' is not recognized" in log and "never" not in log


async def test_run_elevated_and_run_as_system(windows_vm: Callable[..., Awaitable[WindowsVm]]) -> None:
    vm = await windows_vm()
    await customize(vm, powershell("whoami", "whoami /groups", name="as admin"))
    await customize(vm, powershell("whoami", "whoami /groups", name="elevated", run_elevated=True), index=2)
    await customize(vm, powershell("whoami", name="system", run_elevated=True, run_as_system=True), index=3)
    sections = (await vm.log()).split("==> azure-arm: Provisioning with powershell: ")
    admin = f"{vm.machine.computer_name}\\{vm.vm.admin_user}".lower()
    plain = next(s for s in sections if s.startswith("customize 2/9: as admin\n"))
    elevated = next(s for s in sections if s.startswith("customize 3/9: elevated\n"))
    system = next(s for s in sections if s.startswith("customize 4/9: system\n"))
    assert admin in plain and "NT AUTHORITY\\NETWORK" in plain
    assert admin in elevated and "NT AUTHORITY\\BATCH" in elevated and "High Mandatory Level" in elevated
    assert "nt authority\\system" in system


@pytest.mark.parametrize("as_system", [False, True], ids=["elevated", "system"])
async def test_valid_exit_codes_judge_an_elevated_run_by_its_task_result(
    windows_vm: Callable[..., Awaitable[WindowsVm]], as_system: bool
) -> None:
    """An elevated script runs in a scheduled task: its exit code comes back as the task's result and is judged
    as a plain run's would be."""
    vm = await windows_vm()
    how = {"run_elevated": True, "run_as_system": as_system}
    step = powershell("Write-Host installed, restart wanted", "exit 3010", valid_exit_codes=[0, 3010], **how)
    result = await customize(vm, step)
    assert result.exit_code == 3010
    with pytest.raises(PermanentError) as failed:
        await customize(vm, powershell("Write-Host agent refused", "exit 1603", name="agent", **how), index=2)
    assert failed.value.type == "CustomizerFailed"
    assert "customize 3/9: agent failed with exit code 1603" in failed.value.message
    assert "agent refused" in failed.value.message
    log = await vm.log()
    assert "==> azure-arm: customize 2/9: script: exit code 3010" in log
    assert {run.identity.logon for run in vm.machine.runs.values()} == {"service" if as_system else "batch"}


async def test_a_script_longer_than_8000_characters_runs_whole(windows_vm: Callable[..., Awaitable[WindowsVm]]) -> None:
    vm = await windows_vm()
    script = "".join(f"Write-Output 'configuring setting number {n:04d} of the golden image'\r\n" for n in range(150))
    assert len(script) > 8000
    staged = await vm.stage(script.encode(), field="properties.customize[1].scriptUri")
    step = PowerShellCustomizer(type="PowerShell", name="long", script_uri="https://example.invalid/long.ps1")
    await customize(vm, step, staged=[staged])
    log = await vm.log()
    assert all(f"setting number {n:04d}" in log for n in range(150))
    assert vm.machine.longest_command_line <= 8191


async def test_a_restart_slower_than_its_check_interval_is_waited_for(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    vm = await windows_vm(MachineSettings(reboot_seconds=80))  # 0.8 s away; kiln checks every 0.05 s
    vm.machine.files.make_folder("c:\\buildArtifacts")
    step = WindowsRestartCustomizer(
        type="WindowsRestart",
        restart_check_command="echo Azure-Image-Builder-Restarted-the-VM  > c:\\buildArtifacts\\azureImageBuilderRestart.txt",
    )
    await customize(vm, step)
    assert vm.machine.boots == 2
    assert "Restarted-the-VM" in vm.machine.files.read_text("c:\\buildArtifacts\\azureImageBuilderRestart.txt")
    log = await vm.log()
    assert "restart 1: the machine is going down" in log
    back = float(log.split("restart 1: the machine is back after ")[1].split(" s")[0])
    assert back >= 0.8


async def test_a_restart_that_does_not_come_back_in_time_fails_the_step(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    vm = await windows_vm(MachineSettings(reboot_seconds=10**6))
    step = WindowsRestartCustomizer(type="WindowsRestart", restart_timeout="1s")
    with pytest.raises(PermanentError) as timed_out:
        await customize(vm, step)
    assert timed_out.value.type == "RestartTimedOut"
    assert (
        "customize 2/9: WindowsRestart: Timeout waiting for machine to restart: it went down" in timed_out.value.message
    )


async def test_a_restart_command_that_does_not_restart_fails_the_step(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    """Packer would pass this step (its check answers 'restarted.' on the old boot); kiln wants a new boot."""
    vm = await windows_vm()
    step = WindowsRestartCustomizer(type="WindowsRestart", restart_command="echo pretending", restart_timeout="1s")
    with pytest.raises(PermanentError, match="it never went down: 'echo pretending' did not restart it"):
        await customize(vm, step)
    assert vm.machine.boots == 1


@pytest.mark.parametrize(
    ("code", "settings", "restart_command"),
    [
        (1115, MachineSettings(shutdown_seconds=100), None),  # still going down when kiln asks
        (1717, MachineSettings(shutdown_seconds=100, going_down_code=1717), None),  # shutdown's RPC already gone
        (1190, MachineSettings(), 'shutdown /r /f /t 30 /c "in a while"'),  # the command only scheduled it
    ],
    ids=["1115", "1717", "1190"],
)
async def test_a_shutdown_under_way_is_waited_for_whichever_code_says_so(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
    code: int,
    settings: MachineSettings,
    restart_command: str | None,
) -> None:
    """Packer's test shutdown (``shutdown /r /t 60``) answers 1115, 1190 or 1717 while a shutdown is under way:
    each is waited out, saying so, never taken for a machine that is not going down."""
    vm = await windows_vm(settings)
    step = WindowsRestartCustomizer(
        type="WindowsRestart", **({"restart_command": restart_command} if restart_command else {})
    )
    await customize(vm, step)
    assert vm.machine.boots == 2
    _, *tests = vm.machine.shutdown_codes  # the restart command's own, then kiln's test shutdowns
    under_way = [c for c in tests if c in (1115, 1190, 1717)]
    assert code in under_way and 0 not in tests  # no test shutdown was ever scheduled (and aborted)
    log = await vm.log()
    # Each answer kiln heard is said once; the machine may go away before its answer to the last one reaches kiln,
    # which takes that for what it is, the machine going down.
    said = log.count("restart 1: Reboot already in progress, waiting...")
    assert said in (len(under_way), len(under_way) - 1) and said > 0, (said, under_way)
    assert "restart 1: the machine is back after" in log


async def test_a_restart_timeout_left_a_placeholder_fails_naming_the_field_before_any_restart(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    """A documentation template's ``<placeholder>`` passes the template check; the step refuses it for good."""
    vm = await windows_vm()
    with pytest.raises(PermanentError) as refused:
        await customize(vm, WindowsRestartCustomizer(type="WindowsRestart", restart_timeout="<timeout>"))
    assert refused.value.type == "InvalidTemplate"
    assert "customize 2/9: WindowsRestart: Field 'restartTimeout' has a bad value: '<timeout>'" in refused.value.message
    assert vm.machine.shutdown_codes == [] and vm.machine.boots == 1


def windows_update(**fields: Any) -> WindowsUpdateCustomizer:
    return WindowsUpdateCustomizer(type="WindowsUpdate", **fields)


async def test_three_update_rounds_with_restarts_until_none_is_left(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    vm = await windows_vm(MachineSettings(updates=[dataclasses.replace(u) for u in CUMULATIVE]))
    step = windows_update(
        search_criteria="IsInstalled=0", filters=["exclude:$_.Title -like '*Preview*'", "include:$true"]
    )
    await customize(vm, step)
    assert [u.kb for u in vm.machine.installed] == ["KB5034439", "KB5034770", "KB890830"]
    assert vm.machine.boots == 4
    log = await vm.log()
    assert "Skipped (filter) Windows update (KB5035857)" in log
    assert "update round 2: installed KB5034770 2024-02 Cumulative Update for Windows Server 2022 (KB5034770)" in log
    assert "update round 4: no more updates; 3 installed in 4 rounds, 3 restarts" in log


async def test_update_limit_batches_updates_into_rounds(windows_vm: Callable[..., Awaitable[WindowsVm]]) -> None:
    many = [Update(kb=f"KB50{n:05d}", title=f"Update {n} (KB50{n:05d})") for n in range(5)]
    vm = await windows_vm(MachineSettings(updates=many))
    await customize(vm, windows_update(update_limit=2))
    log = await vm.log()
    assert log.count("Found Windows update") == 5 and vm.machine.boots == 4
    assert "update round 3: installed KB5000004" in log


async def test_a_pending_restart_that_refuses_the_install_is_restarted_not_failed(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    """0x80240016: an installation an earlier step started is still pending. AIB failed the build here; kiln
    restarts and tries again."""
    vm = await windows_vm(MachineSettings(updates=[dataclasses.replace(CUMULATIVE[0])], install_blocked=True))
    await customize(vm, windows_update())
    log = await vm.log()
    assert (
        "update round 1: Windows Update refused to install (0x80240016: a restart is pending); restarting first" in log
    )
    assert [u.kb for u in vm.machine.installed] == ["KB5034439"]
    assert "update round 3: no more updates; 1 installed in 3 rounds, 2 restarts" in log


async def test_a_machine_that_keeps_asking_for_restarts_fails_the_step_naming_the_updates(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    vm = await windows_vm(MachineSettings(endless_updates=True))
    with pytest.raises(PermanentError) as looped:
        await customize(vm, windows_update(), profiles=os_profiles(max_restarts=3))
    assert looped.value.type == "RestartLoop"
    assert "asked for a restart 4 times, more than the 3 kiln allows one step" in looped.value.message
    assert "updates still pending: KB5900004 Security Update 4 (KB5900004)" in looped.value.message
    assert vm.machine.boots == 4


async def test_a_step_may_restart_the_machine_10_times_by_default(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    vm = await windows_vm(
        MachineSettings(endless_updates=True, shutdown_seconds=1, reboot_seconds=2, install_seconds=2)
    )
    with pytest.raises(PermanentError) as looped:
        await customize(vm, windows_update())
    assert looped.value.type == "RestartLoop"
    assert "asked for a restart 11 times, more than the 10 kiln allows one step" in looped.value.message
    assert vm.machine.boots == 11


async def test_a_retried_update_step_carries_on_with_the_round_it_was_in(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    """The first attempt loses the machine's WinRM service in round 2 (the round itself runs on, detached); the
    retry, given the first attempt's last heartbeat, re-attaches to round 2 instead of starting over."""
    vm = await windows_vm(
        MachineSettings(updates=[dataclasses.replace(u) for u in CUMULATIVE[:2]], install_seconds=150)
    )
    endpoint = vm.machine.endpoint
    assert endpoint is not None
    beats: list[Any] = []
    first = ActivityEnvironment()

    def heartbeat(*details: Any) -> None:
        beats.append(details)
        running = any(folder.endswith("round-2") for folder in vm.machine.runs)
        if running and not endpoint.faults:
            endpoint.inject("Create", "http500", times=10**6)  # from now on the service answers nothing useful

    first.on_heartbeat = heartbeat
    with pytest.raises(Exception, match="did not answer"):
        await customize(vm, windows_update(), env=first)
    endpoint.faults.clear()
    second = ActivityEnvironment()
    second.info = dataclasses.replace(
        ActivityEnvironment.default_info(), attempt=2, heartbeat_details=[dict(beats[-1][0])]
    )
    await customize(vm, windows_update(), env=second)
    rounds = {folder.rsplit("-", 2)[-2] + folder[-1]: run.starts for folder, run in vm.machine.runs.items()}
    assert rounds == {"round1": 1, "round2": 2, "round3": 1}  # round 2 was started once, then attached to
    assert [u.kb for u in vm.machine.installed] == ["KB5034439", "KB5034770"]
    log = await vm.log()
    assert log.count("Installing 1 Windows updates...") == 2
    assert "no more updates; 2 installed in 3 rounds, 2 restarts" in log


async def test_sysprep_runs_aibs_script_written_before_the_customizers(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    vm = await windows_vm()
    # A template edits the script in place, as community templates do to add /mode:vm.
    edit = "(Get-Content c:\\DeprovisioningScript.ps1 -Raw) -replace '/quiet /quit','/quiet /quit /mode:vm' | Set-Content c:\\DeprovisioningScript.ps1"
    await customize(vm, powershell(edit, name="mode vm"), index=0)
    request = GuestScriptRequest(build=vm.build, staging=vm.staging, vm=vm.vm, index=1, label="deprovision")
    await ActivityEnvironment().run(GeneralizeActivities(vm.cloud, os_profiles()).generalize, request)
    assert vm.machine.image_state() == GENERALIZED
    assert vm.machine.sysprep_arguments == "/oobe /generalize /quiet /quit /mode:vm"
    log = await vm.log()
    assert "==> azure-arm: running c:\\DeprovisioningScript.ps1 (AIB's default, as the customizers left it)" in log
    assert ">>> Sysprep complete ..." in log


async def test_sysprep_that_never_generalizes_fails_within_its_limit_naming_its_state(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    vm = await windows_vm(MachineSettings(sysprep_stuck=True))
    request = GuestScriptRequest(build=vm.build, staging=vm.staging, vm=vm.vm, index=0, label="deprovision")
    activities = GeneralizeActivities(vm.cloud, os_profiles(sysprep_limit=1.0))
    with pytest.raises(PermanentError) as stuck:
        await ActivityEnvironment().run(activities.generalize, request)
    assert stuck.value.type == "StepTimedOut"
    assert "deprovision did not finish within 1 s: sysprep stuck in IMAGE_STATE_UNDEPLOYABLE" in stuck.value.message
    await asyncio.sleep(0.1)
    [run] = vm.machine.runs.values()
    assert run.killed


async def test_a_small_file_is_pushed_and_a_large_one_fetched_by_the_vm(
    windows_vm: Callable[..., Awaitable[WindowsVm]],
) -> None:
    vm = await windows_vm()
    vm.machine.files.make_folder("c:\\buildArtifacts")
    small, large = b"<h1>golden</h1>\n", bytes(range(256)) * 64
    profiles = os_profiles(fetch_above=4096)
    step = FileCustomizer(
        type="File", name="page", source_uri="https://example.invalid/f", destination="c:\\buildArtifacts\\index.html"
    )
    await customize(vm, step, profiles=profiles, staged=[await vm.stage(small)])
    assert vm.machine.files.read("c:\\buildArtifacts\\index.html") == small
    assert not any("# kiln fetch-file" in c for c in vm.machine.commands)
    big = step.model_copy(update={"destination": "c:\\buildArtifacts\\tools.zip"})
    await customize(vm, big, profiles=profiles, staged=[await vm.stage(large)])
    assert vm.machine.files.read("c:\\buildArtifacts\\tools.zip") == large
    [fetch] = [c for c in vm.machine.commands if "# kiln fetch-file" in c]
    assert "sig=" in fetch  # a SAS the VM fetched with
    assert "sig=" not in await vm.log()
    missing = step.model_copy(update={"destination": "c:\\nowhere\\index.html"})
    with pytest.raises(PermanentError) as refused:
        await customize(vm, missing, profiles=profiles, staged=[await vm.stage(small)])
    assert refused.value.type == "DestinationMissing" and "c:\\nowhere does not exist" in refused.value.message


async def test_the_live_view_shows_each_restart_and_update_round_as_the_log_has_them(
    windows_vm: Callable[..., Awaitable[WindowsVm]], tmp_path: Path
) -> None:
    """What ``kiln build`` and ``kiln watch`` print from a Windows Update step's log, on a terminal and off one."""
    vm = await windows_vm(MachineSettings(updates=[dataclasses.replace(u) for u in CUMULATIVE[:2]]))
    await customize(vm, windows_update())
    log = tmp_path / "customization.log"
    log.write_text(await vm.log())
    step = StepRecord(name="customize 2/9: WindowsUpdate", started=datetime.now(UTC))
    status = BuildStatus(steps=[step], log_uri=log.as_uri())
    view = BuildView("win", footer="")
    view.status = status
    lines = await read_new_lines(LogTail(), view)

    plain = Console(file=io.StringIO(), width=200)
    EventPrinter(plain).update(status, "", lines)
    printed = plain.file.getvalue()  # type: ignore[attr-defined]
    assert "↻ customize 2/9: WindowsUpdate: update round 1: installed KB5034439 2024-01 Servicing Stack" in printed
    assert "↻ customize 2/9: WindowsUpdate: restart 2: the machine is back after" in printed
    assert "↻ customize 2/9: WindowsUpdate: update round 3: no more updates; 2 installed in 3 rounds" in printed
    assert "│     azure-arm: Found Windows update (KB5034770; 40 MB)" in printed
    assert "↻ customize 2/9: WindowsUpdate: update round 1: exit code" not in printed  # a log line, no event

    terminal = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    terminal.print(view)
    row = next(r for r in terminal.file.getvalue().splitlines() if "customize 2/9" in r)  # type: ignore[attr-defined]
    assert "↻ update round 3: no more updates" in row
