"""Whole Windows builds on the Azure cloud: the corpus's Windows templates through a real worker, the ImageBuild
workflow, the ARM emulator (real SDK clients), Azurite, and scripted Windows machines reached with pywinrm over
WinRM/HTTPS; then the faults that a Windows build adds: a cancel while the machine restarts, a worker killed in the
middle of an update round, a restart that never comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from tests.arm_emulator import ArmEmulator
from tests.azure.environment import AzureHarness, Guests, prepare, temporary
from tests.azure.test_azure_faults import resume_points_recorded, worker_process
from tests.unit.test_template import ARM_PARAMETERS
from tests.workflows.harness import retried_activities
from tests.wsman import GENERALIZED, MachineSettings, Update, WindowsMachine
from workflows.models import RunState

UPDATES = [
    Update(kb="KB5034439", title="2024-01 Servicing Stack Update (KB5034439)", wave=1),
    Update(kb="KB5034770", title="2024-02 Cumulative Update (KB5034770)", wave=2),
    Update(kb="KB5035857", title="2024-03 Cumulative Update Preview (KB5035857)", wave=2),
]


@pytest_asyncio.fixture
async def harness(
    client: Client, arm: ArmEmulator, blob_account: str, guests: Guests, tmp_path: Path
) -> AsyncIterator[AzureHarness]:
    guests.attach(arm)
    guests.windows = lambda spec: MachineSettings(updates=[dataclasses.replace(u) for u in UPDATES])
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    harness = AzureHarness(client, arm, blob_account, os.urandom(32), f"kiln-azure-test-{uuid.uuid4()}", artifacts, [])
    harness.start_worker()
    await prepare(harness.arm.base_url)
    yield harness
    await harness.stop_workers()


def build_machine(guests: Guests) -> WindowsMachine:
    return next(m for name, m in guests.machines.items() if name.endswith("-build"))


CORPUS_BUILDS = [
    "q0_helloImageTemplateWin.json",
    "q1_armTemplateWinSIG.json",
    "qvalW_validators_with_a_windows_image.json",
    "s14_armTemplateWVD.json",
]


@pytest.mark.parametrize("name", CORPUS_BUILDS)
async def test_a_windows_corpus_template_builds(harness: AzureHarness, guests: Guests, name: str) -> None:
    template = harness.corpus(name, parameters=ARM_PARAMETERS, imageDefName="windows")
    status = await harness.finish(await harness.start(template, name.split("_")[0]))
    assert status.run_state == RunState.SUCCEEDED, status.message
    assert [o.provisioning_state for o in status.run_outputs] == ["Succeeded"]
    machine = build_machine(guests)
    assert machine.image_state() == GENERALIZED and machine.sysprep_arguments == "/oobe /generalize /quiet /quit"
    # The template's filter left the preview out; the rest went in over rounds with a restart after each.
    assert [u.kb for u in machine.installed] == ["KB5034439", "KB5034770"]
    restarts = sum(s["type"] == "WindowsRestart" for s in template["properties"]["customize"])
    assert machine.boots == 1 + restarts + 2
    cloud = harness.workers[0][2]
    log = (await (await cloud.blobs.blob(status.log_uri).download_blob()).readall()).decode()
    assert "update round 3: no more updates; 2 installed in 3 rounds, 2 restarts" in log
    assert ">>> Sysprep complete ..." in log and "==> azure-arm: deprovision: exit code 0" in log
    if name.startswith("q0") or name.startswith("q1"):
        assert machine.files.read("c:\\buildArtifacts\\index.html") == b"<h1>golden</h1>\n"
        assert "Restarted-the-VM" in machine.files.read_text("c:\\buildArtifacts\\azureImageBuilderRestart.txt")
    if name.startswith("qval"):
        validation = status.log_uri.replace("customization.log", "validation.log")
        checked = (await (await cloud.blobs.blob(validation).download_blob()).readall()).decode()
        assert "HelloValidate" in checked and "ByeValidate" in checked
    if name.startswith("s14"):
        assert [r.identity.user for r in machine.runs.values() if "\nmkdir" in f"\n{r.script}"] == ["SYSTEM"] * 3
    assert temporary(harness.arm) == []


def windows_template(harness: AzureHarness, *customize: dict) -> dict:
    template = harness.corpus("q0_helloImageTemplateWin.json")
    template["properties"]["customize"] = list(customize)
    return template


async def test_a_restart_that_never_comes_back_fails_the_build_and_cleans_up(
    harness: AzureHarness, guests: Guests
) -> None:
    guests.windows = lambda spec: MachineSettings(reboot_seconds=10**6)
    template = windows_template(harness, {"type": "WindowsRestart", "restartTimeout": "2s"})
    status = await harness.finish(await harness.start(template, "win-restart-timeout"))
    assert status.run_state == RunState.FAILED
    assert "customize 1/1: WindowsRestart" in status.message, status.message
    assert "Timeout waiting for machine to restart: it went down and did not come back within 2 s" in status.message
    assert harness.arm.resources({"kilnBuildId": status.build_id}) == []


async def test_a_cancel_while_the_machine_restarts_stops_the_build_and_leaves_nothing(
    harness: AzureHarness, guests: Guests
) -> None:
    guests.windows = lambda spec: MachineSettings(reboot_seconds=10**6)
    template = windows_template(harness, {"type": "WindowsRestart", "restartTimeout": "1h"})
    handle = await harness.start(template, "win-cancel-restart")
    async with asyncio.timeout(60):
        while not guests.machines or build_machine(guests).power != "down":
            await asyncio.sleep(0.05)
    await handle.cancel()
    status = await harness.finish(handle)
    assert status.run_state == RunState.CANCELED
    assert "Canceled during customize 1/1: WindowsRestart" in status.message, status.message
    assert harness.arm.resources({"kilnBuildId": status.build_id}) == []
    assert build_machine(guests).power == "deleted"


async def test_a_worker_killed_mid_update_round_leaves_the_round_to_the_next_worker(
    harness: AzureHarness, guests: Guests
) -> None:
    """The worker is SIGKILLed while round 2 installs; the next one re-attaches to round 2 from the heartbeat
    (round, phase, updates installed so far) instead of starting the update step over."""
    await harness.stop_workers()
    guests.windows = lambda spec: MachineSettings(
        updates=[dataclasses.replace(u) for u in UPDATES], install_seconds=300
    )
    template = windows_template(harness, {"type": "WindowsUpdate"})
    scenario = _Scenario(harness)
    async with worker_process(scenario) as first:
        handle = await harness.start(template, "win-kill-update")
        async with asyncio.timeout(120):
            while not any(f.endswith("round-2") for f in (build_machine(guests).runs if guests.machines else {})):
                await asyncio.sleep(0.05)
        await resume_points_recorded(handle, b'"round":2')  # the round's heartbeat has reached Temporal
        first.kill()
        await first.wait()
    async with worker_process(scenario):
        status = await harness.finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message
    assert await retried_activities(handle) == {"run_customizer"}
    machine = build_machine(guests)
    starts = {
        folder.rsplit("-", 2)[-2] + folder[-1]: run.starts for folder, run in machine.runs.items() if "round" in folder
    }
    assert starts == {"round1": 1, "round2": 2, "round3": 1}, starts
    assert [u.kb for u in machine.installed] == ["KB5034439", "KB5034770", "KB5035857"]
    assert temporary(harness.arm) == []


@dataclasses.dataclass
class _Scenario:
    """What ``worker_process`` needs of a fault scenario: the harness."""

    h: AzureHarness

    @property
    def arm(self) -> ArmEmulator:
        return self.h.arm
