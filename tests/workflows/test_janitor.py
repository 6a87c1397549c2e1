"""The janitor finishes the cleanup of a build that was terminated (terminate runs no workflow code), or whose own
cleanup failed for good."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from temporalio.client import Client

from activities.janitor import schedule_janitor
from cli.main import main
from tests.workflows.harness import Harness
from workflows.janitor import JanitorWorkflow
from workflows.models import BuildStatus, JanitorReport, JanitorRequest, RunState


async def run_janitor(client: Client, harness: Harness, build_id: str) -> JanitorReport:
    """Run the janitor until it has seen the build: visibility catches up with a terminate within moments."""
    async with asyncio.timeout(30):
        while True:
            report = await client.execute_workflow(
                JanitorWorkflow.run,
                JanitorRequest(task_queue=harness.task_queue),
                id=f"janitor-{uuid.uuid4()}",
                task_queue=harness.task_queue,
            )
            if build_id in report.builds:
                return report
            await asyncio.sleep(0.5)


async def test_janitor_deletes_what_a_terminated_build_left(harness: Harness, client: Client) -> None:
    harness.cloud.inject("customize", "hang")
    handle = await harness.start(harness.template())
    await harness.wait_for_step(handle, "customize")
    await handle.terminate("operator pulled the plug")
    left = harness.cloud.alive()
    assert {kind for kind, _ in left} >= {"virtualMachine", "resourceGroup", "disk"}

    report = await run_janitor(client, harness, handle.id)

    assert harness.cloud.alive() == []
    assert report.failed == []
    assert any("delete build VM" in line for line in report.cleaned)
    assert any("delete staging" in line for line in report.cleaned)


async def test_janitor_finishes_a_cleanup_that_failed_for_good(harness: Harness, client: Client) -> None:
    """The build VM's delete is refused (a permission missing at the time) both when the VM is freed after capture
    and at the build's end: the build ends, says so, and keeps that undo stacked; the janitor's run deletes it."""
    harness.cloud.inject("delete_vm", "fatal", times=2)
    template = harness.template()
    del template["properties"]["validate"]  # the build VM is then the only VM deleted
    handle = await harness.start(template)
    status = await harness.finish(handle)
    failed = [s for s in status.steps if s.name.startswith("cleanup") and s.outcome == "failed"]
    assert [s.name for s in failed] == ["cleanup: delete build VM"] * 2, status.steps
    assert [u.label for u in status.pending_cleanup] == ["delete build VM"]
    assert status.run_state == RunState.SUCCEEDED  # the image was made; the message says what is left
    assert status.message == (
        "Cleanup left resources behind, for `kiln janitor` to retry: "
        "cleanup: delete build VM: injected failure at delete_vm"
    )
    assert ("virtualMachine", f"{status.build_id}-build") in harness.cloud.alive()

    report = await run_janitor(client, harness, handle.id)

    assert report.failed == []
    assert report.cleaned == [f"{handle.id}: delete build VM"]
    assert harness.cloud.alive() == []


async def test_a_cleanup_failing_the_same_way_again_and_again_is_reported_and_left_for_the_janitor(
    harness: Harness, client: Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The staging delete keeps meeting the same retryable error (no passing fault: say, a lock nobody will
    release): after KILN_CLEANUP_STUCK_AFTER attempts in a row it is no longer retried, the build ends in its true
    state instead of staying Running, `kiln list` shows what it left, and the janitor deletes it later."""
    monkeypatch.setenv("KILN_CLEANUP_STUCK_AFTER", "3")
    harness.cloud.inject("delete_staging", "transient")
    handle = await harness.start(harness.template())
    async with asyncio.timeout(60):
        status = await harness.finish(handle)
    assert harness.cloud.faults_taken("delete_staging") == 3
    assert status.run_state == RunState.SUCCEEDED
    assert status.message == (
        "Cleanup left resources behind, for `kiln janitor` to retry: cleanup: delete staging: failed the same way "
        "3 times in a row: InjectedTransientError: injected transient failure at delete_staging"
    )
    assert [u.label for u in status.pending_cleanup] == ["delete staging"]

    monkeypatch.setenv("TEMPORAL_ADDRESS", client.service_client.config.target_host)
    monkeypatch.setenv("COLUMNS", "300")
    async with asyncio.timeout(30):  # the build list is eventually consistent
        while True:
            assert await asyncio.to_thread(main, ["list", "--limit", "100"]) == 0
            row = next((line for line in capsys.readouterr().out.splitlines() if handle.id in line), "")
            if "cleanup: delete staging" in row:
                break
            await asyncio.sleep(0.5)

    harness.cloud.clear_faults()
    report = await run_janitor(client, harness, handle.id)
    assert report.cleaned == [f"{handle.id}: delete staging"]
    assert harness.cloud.alive() == []


async def test_janitor_leaves_finished_and_running_builds_alone(harness: Harness, client: Client) -> None:
    finished = await harness.start(harness.template())
    await harness.finish(finished)
    harness.cloud.inject("customize", "hang")
    running = await harness.start(harness.template())
    await harness.wait_for_step(running, "customize")
    alive_before = harness.cloud.alive()

    report = await client.execute_workflow(
        JanitorWorkflow.run,
        JanitorRequest(task_queue=harness.task_queue),
        id=f"janitor-{uuid.uuid4()}",
        task_queue=harness.task_queue,
    )

    assert finished.id not in report.builds and running.id not in report.builds
    assert harness.cloud.alive() == alive_before
    await running.cancel()
    await harness.finish(running)


async def test_the_janitor_schedule_a_worker_keeps_runs_the_janitor_and_is_kept_up_to_date(
    harness: Harness, client: Client
) -> None:
    """What ``worker.py --dev`` (and ``--janitor-every``) sets up: asked twice, one schedule, at the newest interval."""
    cloud = f"test-{uuid.uuid4().hex[:6]}"
    schedule_id = await schedule_janitor(client, cloud=cloud, task_queue=harness.task_queue, every=timedelta(hours=2))
    assert await schedule_janitor(client, cloud=cloud, task_queue=harness.task_queue, every=timedelta(hours=1)) == (
        schedule_id
    )
    handle = client.get_schedule_handle(schedule_id)
    description = await handle.describe()
    assert description.schedule.spec.intervals[0].every == timedelta(hours=1)
    await handle.trigger()
    async with asyncio.timeout(30):
        while not (description := await handle.describe()).info.recent_actions:
            await asyncio.sleep(0.3)
    run = client.get_workflow_handle(description.info.recent_actions[0].action.workflow_id, result_type=JanitorReport)
    assert (await run.result()).failed == []
    await handle.delete()


async def test_janitor_deletes_by_tag_what_no_undo_names_and_keeps_outputs_and_running_builds(
    harness: Harness, client: Client
) -> None:
    """A terminated build made a disk whose undo it never recorded, and an output that is the user's; a running
    build has a disk of its own. The sweep deletes the first alone."""
    harness.cloud.inject("customize", "hang")
    closed = await harness.start(harness.template())
    await harness.wait_for_step(closed, "customize")
    running = await harness.start(harness.template())
    await harness.wait_for_step(running, "customize")
    await closed.terminate("operator pulled the plug")
    closed_id = (await closed.query("status", result_type=BuildStatus)).build_id
    running_id = (await running.query("status", result_type=BuildStatus)).build_id
    harness.cloud.leave(closed_id, "disk", f"{closed_id}-unrecorded")
    harness.cloud.leave(closed_id, "managedImage", f"{closed_id}-output", output=True)
    harness.cloud.leave(running_id, "disk", f"{running_id}-unrecorded")
    running_before = harness.cloud.alive(include_outputs=True, build_id=running_id)

    report = await run_janitor(client, harness, closed.id)

    assert f"{closed.id}: {closed_id}-unrecorded" in report.swept
    assert harness.cloud.alive(include_outputs=True, build_id=closed_id) == [("managedImage", f"{closed_id}-output")]
    assert harness.cloud.alive(include_outputs=True, build_id=running_id) == running_before
    assert ("disk", f"{running_id}-unrecorded") in running_before
    assert report.failed == []
    await running.cancel()
    await harness.finish(running)
