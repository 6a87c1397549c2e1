"""Hours and days of a template's life in seconds: a dev server with per-workflow time skipping (the
``frontend.WorkflowTimeSkippingEnabled`` dynamic config), builds on the recording cloud.

The server's scheduler does not run on a workflow's virtual clock, so schedules are tested on wall-clock time
(``test_schedules``); a trigger's interval is a timer in the entity, and skips.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from cli.templates import create_template
from tests.services import temporal_cli
from tests.workflows.harness import serving
from tests.workflows.test_image_template import runs_ended, state_of, unique
from workflows.golden_models import TriggerRequest
from workflows.image_template import ImageTemplateWorkflow
from workflows.models import SEARCH_ATTRIBUTES


@pytest_asyncio.fixture(scope="module")
async def skipping() -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_time_skipping_v2(
        dev_server_existing_path=temporal_cli(),
        dev_server_extra_args=["--dynamic-config-value", "frontend.WorkflowTimeSkippingEnabled=true"],
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_log_level="error",
    ) as env:
        yield env


async def test_an_hourly_trigger_deactivates_after_its_failure_limit_within_a_day(
    skipping: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with serving(skipping.client, tmp_path) as harness:
        entity = await create_template(
            skipping.client, unique(), harness.template(), cloud="recording", task_queue=harness.task_queue
        )
        await entity.execute_update(
            ImageTemplateWorkflow.create_trigger, TriggerRequest(interval_seconds=3600, failure_limit=2)
        )
        harness.cloud.inject("customize", "fatal")
        harness.cloud.publish_source_version("2.0.0")

        # A fast-forward moves the entity's clock at once, and the timers due fire then: an hour at a time, each
        # hour's check and the build it starts run before the next hour is skipped.
        for hour in (1, 2, 3):
            await skipping.fast_forward(entity, timedelta(hours=1, seconds=1))
            await runs_ended(entity, min(hour, 2))
        state = await state_of(entity)
        assert [(r.reason, r.run_state) for r in state.runs] == [("trigger", "Failed")] * 2
        assert not state.trigger.enabled and state.trigger.status.code == "Unhealthy"
        started = [r.start_time for r in state.runs]
        assert started[1] - started[0] >= timedelta(hours=1)  # one build per check, an hour apart
