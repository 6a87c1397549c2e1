"""The janitor finishes the cleanup of a build that was terminated (terminate runs no workflow code)."""

from __future__ import annotations

import asyncio
import uuid

from temporalio.client import Client

from tests.workflows.harness import Harness
from workflows.janitor import JanitorWorkflow
from workflows.models import JanitorReport, JanitorRequest


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
