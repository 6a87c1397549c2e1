"""The ImageTemplate entity on a real dev server, its builds on the recording cloud: runs as child builds,
lastRunStatus and run history, cancel, revisions, delete, autoRun, and continue-as-new with nothing lost."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from cli.builds import UsageError
from cli.templates import create_template, update
from tests.workflows.harness import Harness
from workflows.golden_models import RunRecord, RunRequest, TemplateState, UpdateTemplateRequest
from workflows.image_template import ImageTemplateWorkflow


def unique(prefix: str = "golden") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def new_template(harness: Harness, template: dict[str, Any] | None = None, **options: Any) -> WorkflowHandle:
    return await create_template(
        harness.client,
        unique(),
        template or harness.template(),
        cloud="recording",
        task_queue=harness.task_queue,
        **options,
    )


async def replays(handle: WorkflowHandle) -> None:
    """The entity's history so far replays on this code: its handlers and background tasks are deterministic."""
    replayer = Replayer(workflows=[ImageTemplateWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(await handle.fetch_history())


async def state_of(handle: WorkflowHandle) -> TemplateState:
    return await handle.query(ImageTemplateWorkflow.describe)


async def runs_ended(handle: WorkflowHandle, count: int, timeout: float = 60) -> list[RunRecord]:
    """Wait until the template has ``count`` runs, all ended; its runs."""
    async with asyncio.timeout(timeout):
        while True:
            state = await state_of(handle)
            if len(state.runs) >= count and all(r.finished for r in state.runs):
                return state.runs
            await asyncio.sleep(0.3)


async def run_ended(handle: WorkflowHandle, number: int, timeout: float = 60) -> RunRecord:
    """Wait until run ``number`` of the template has ended; its record."""
    async with asyncio.timeout(timeout):
        while True:
            state = await state_of(handle)
            if len(state.runs) >= number and state.runs[number - 1].finished:
                return state.runs[number - 1]
            await asyncio.sleep(0.3)


async def test_a_run_is_a_child_build_and_its_end_is_the_template_s_last_run_status(
    harness: Harness, client: Client
) -> None:
    handle = await new_template(harness)
    record = await handle.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
    name = (await state_of(handle)).name
    assert record.build == f"{name}-1" and record.run_state == "Running" and record.revision == 1

    ended = await run_ended(handle, 1)

    build = await client.get_workflow_handle(record.build).describe()
    assert build.workflow_type == "ImageBuild"
    assert build.parent_id == handle.id
    assert ended.run_state == "Succeeded"
    assert {o.run_output_name for o in ended.run_outputs} == {"managed", "gallery", "vhd"}
    assert ended.source_exact_version == "1.0.0"
    # Lineage: the staged scriptUri and sourceUri, each with the sha256 of what was staged.
    assert sorted(a.source_uri.rsplit("/", 1)[1] for a in ended.artifacts) == ["configure.sh", "index.html"]
    assert all(len(a.sha256) == 64 for a in ended.artifacts)
    state = await state_of(handle)
    assert state.last_run_status == ended


async def test_a_second_manual_run_while_one_builds_is_refused_and_cancel_stops_it(harness: Harness) -> None:
    handle = await new_template(harness)
    harness.cloud.inject("customize", "hang")
    record = await handle.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
    await harness.wait_for_step(harness.client.get_workflow_handle(record.build), "customize")

    try:
        await update(handle, "run_template", RunRequest())
        raise AssertionError("a second run was accepted")
    except UsageError as err:
        assert f"already running build {record.build}" in str(err)
    await handle.execute_update(ImageTemplateWorkflow.cancel_run)

    ended = await run_ended(handle, 1)
    assert ended.run_state == "Canceled"
    assert harness.cloud.alive() == []  # the build cleaned up as a cancelled build does
    await replays(handle)


async def test_update_makes_a_revision_the_next_run_builds_and_delete_ends_the_entity(harness: Harness) -> None:
    handle = await new_template(harness)
    changed = harness.template(buildTimeoutInMinutes=90)
    revision = await handle.execute_update(
        ImageTemplateWorkflow.update_template, UpdateTemplateRequest(template=changed)
    )
    assert revision.revision == 2
    await handle.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
    ended = await run_ended(handle, 1)
    assert ended.revision == 2 and ended.run_state == "Succeeded"

    await handle.execute_update(ImageTemplateWorkflow.delete)
    final = await handle.result()
    assert final.deleted and [r.revision for r in final.revisions] == [1, 2]


async def test_auto_run_enabled_builds_once_on_create(harness: Harness) -> None:
    handle = await new_template(harness, harness.template(autoRun={"state": "Enabled"}))
    ended = await run_ended(handle, 1)
    assert ended.reason == "autoRun" and ended.run_state == "Succeeded"
    await asyncio.sleep(1)
    assert len((await state_of(handle)).runs) == 1


async def test_the_entity_continues_as_new_with_its_history_intact(harness: Harness) -> None:
    handle = await new_template(harness, history_limit=40)
    for number in (1, 2, 3):
        await handle.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
        await run_ended(handle, number)
    await handle.execute_update(
        ImageTemplateWorkflow.update_template, UpdateTemplateRequest(template=harness.template())
    )

    async with asyncio.timeout(30):
        while (state := await state_of(handle)).generation < 2:
            await asyncio.sleep(0.3)
    first_run = (await harness.client.get_workflow_handle(handle.id).describe()).run_id
    assert first_run != handle.result_run_id  # a new run of the same entity
    assert [r.number for r in state.runs] == [1, 2, 3]
    assert all(r.run_state == "Succeeded" for r in state.runs)
    assert [r.revision for r in state.revisions] == [1, 2]
    # The new run takes runs and updates as the old one did.
    await handle.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
    fourth = await run_ended(handle, 4)
    assert fourth.run_state == "Succeeded" and fourth.revision == 2
    await replays(harness.client.get_workflow_handle(handle.id))
