"""Schedules and SourceImage triggers on a real dev server, builds on the recording cloud.

The dev server's schedules run on wall-clock time (time skipping does not reach the server's scheduler), so
weeks of a weekly schedule are run the way an operator catches up on them: a backfill over those weeks, which
starts each run that was due, one after another, in seconds.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from temporalio.client import Client, ScheduleBackfill, ScheduleHandle, ScheduleOverlapPolicy

from cli.builds import UsageError
from cli.templates import schedule_of, update
from tests.workflows.harness import Harness
from tests.workflows.test_image_template import new_template, replays, runs_ended, state_of
from workflows.golden_models import RunRecord, RunRequest, StartCondition, TriggerRequest, UpdateTemplateRequest
from workflows.image_template import ImageTemplateWorkflow


async def new_schedule(
    harness: Harness, template: str, *, when: StartCondition, cron: str = "0 3 * * 0"
) -> ScheduleHandle:
    name = f"weekly-{uuid.uuid4().hex[:6]}"
    return await harness.client.create_schedule(
        name, schedule_of(name=name, template=template, task_queue=harness.task_queue, cron=cron, when=when)
    )


async def scheduled_results(client: Client, schedule: ScheduleHandle, count: int) -> list[RunRecord]:
    """The results of the schedule's first ``count`` runs, once each has ended."""
    async with asyncio.timeout(60):
        while len((info := (await schedule.describe()).info).recent_actions) < count:
            await asyncio.sleep(0.3)
    results = []
    for action in info.recent_actions[:count]:
        handle = client.get_workflow_handle(
            action.action.workflow_id, run_id=action.action.first_execution_run_id, result_type=RunRecord
        )
        results.append(await handle.result())
    return results


async def test_a_weekly_schedule_runs_three_weeks_of_builds_in_seconds(harness: Harness, client: Client) -> None:
    entity = await new_template(harness)
    name = (await state_of(entity)).name
    schedule = await new_schedule(harness, name, when="always")
    now = datetime.now(UTC)
    # Three Sundays at 03:00 fall in any 21 days that end just before now.
    await schedule.backfill(
        ScheduleBackfill(start_at=now - timedelta(days=21), end_at=now, overlap=ScheduleOverlapPolicy.BUFFER_ALL)
    )

    results = await scheduled_results(client, schedule, 3)

    assert [r.run_state for r in results] == ["Succeeded"] * 3
    runs = await runs_ended(entity, 3)
    assert [(r.reason, r.requested_by) for r in runs] == [("schedule", schedule.id)] * 3
    description = await schedule.describe()
    assert description.info.next_action_times[0] > now  # the next Sunday is still to come
    # Each scheduled build is listed as any build is, under the template's name.
    await asyncio.sleep(1.5)  # visibility catches up
    listed = [e.id async for e in client.list_workflows(f"WorkflowType = 'ImageBuild' AND KilnTemplate = '{name}'")]
    assert sorted(listed) == sorted(r.build for r in runs)


async def test_source_changed_builds_once_per_source_version_and_skips_otherwise(
    harness: Harness, client: Client
) -> None:
    entity = await new_template(harness)
    schedule = await new_schedule(harness, (await state_of(entity)).name, when="source-changed")

    async def run_now(count: int) -> RunRecord:
        await schedule.trigger()
        return (await scheduled_results(client, schedule, count))[-1]

    first = await run_now(1)
    assert first.run_state == "Succeeded" and first.source_exact_version == "1.0.0"
    unchanged = await run_now(2)
    assert unchanged.run_state == "Skipped"
    assert unchanged.message == "skipped: source unchanged (1.0.0)"
    harness.cloud.publish_source_version("1.1.0")
    bumped = await run_now(3)
    assert bumped.run_state == "Succeeded" and bumped.source_exact_version == "1.1.0"
    assert (await run_now(4)).run_state == "Skipped"
    # A new template revision counts as a change even with the source unchanged.
    await entity.execute_update(
        ImageTemplateWorkflow.update_template,
        UpdateTemplateRequest(template=harness.template()),
    )
    assert (await run_now(5)).run_state == "Succeeded"
    states = [r.run_state for r in (await state_of(entity)).runs]
    assert states == ["Succeeded", "Skipped", "Succeeded", "Skipped", "Succeeded"]


async def test_a_trigger_builds_on_a_new_source_version_and_deactivates_after_repeated_failures(
    harness: Harness,
) -> None:
    entity = await new_template(harness)
    trigger = await entity.execute_update(
        ImageTemplateWorkflow.create_trigger, TriggerRequest(interval_seconds=1, failure_limit=2)
    )
    assert trigger.status.code == "Healthy" and trigger.last_source_version == "1.0.0"
    await asyncio.sleep(2.5)
    assert (await state_of(entity)).runs == []  # no new version: no build

    harness.cloud.publish_source_version("2.0.0")
    fired = await runs_ended(entity, 1)
    assert fired[0].reason == "trigger" and fired[0].source_exact_version == "2.0.0"
    assert fired[0].run_state == "Succeeded"

    harness.cloud.inject("customize", "fatal")
    harness.cloud.publish_source_version("3.0.0")
    async with asyncio.timeout(60):
        while (state := await state_of(entity)).trigger.enabled:
            await asyncio.sleep(0.3)
    assert [r.run_state for r in state.runs[1:]] == ["Failed", "Failed"]
    assert state.trigger.status.code == "Unhealthy"
    assert "deactivated after 2 consecutive failed builds" in state.trigger.status.message
    await asyncio.sleep(2.5)
    assert len((await state_of(entity)).runs) == 3  # deactivated: no more builds

    harness.cloud.clear_faults()
    await entity.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
    await runs_ended(entity, 4)
    state = await state_of(entity)
    assert state.trigger.enabled and state.trigger.status.code == "Healthy"
    assert state.trigger.last_source_version == "3.0.0"
    await replays(entity)


async def test_a_trigger_is_refused_as_aib_refuses_it(harness: Harness) -> None:
    pinned = harness.template()
    gallery = pinned["properties"]["distribute"][1]
    gallery["galleryImageId"] += "/versions/1.0.0"
    entity = await new_template(harness, pinned)
    try:
        await update(entity, "create_trigger", TriggerRequest())
        raise AssertionError("a trigger on a pinned output version was accepted")
    except UsageError as err:
        assert "properties.distribute[1].galleryImageId" in str(err) and "must not pin" in str(err)

    fixed = harness.template()
    fixed["properties"]["source"]["version"] = "12.0.1"
    other = await new_template(harness, fixed)
    try:
        await update(other, "create_trigger", TriggerRequest())
        raise AssertionError("a trigger on a pinned source was accepted")
    except UsageError as err:
        assert "properties.source" in str(err) and "'latest'" in str(err)
