"""Recorded build histories replay on today's ImageBuildWorkflow: a change that would break the builds running
when it is deployed (a step added, removed or reordered without ``workflow.patched``) fails here.
How to re-record: ``tests/histories/record.py``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.histories.record import BUILDS, HISTORIES
from workflows.build import ImageBuildWorkflow

RECORDED = sorted(HISTORIES.glob("*.json"))


def history(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text())


def test_every_recorded_outcome_has_a_history() -> None:
    """The histories on disk are the ones record.py makes: none missing, none stale."""
    assert sorted(path.stem for path in RECORDED) == sorted(BUILDS)


@pytest.mark.parametrize("path", RECORDED, ids=[path.stem for path in RECORDED])
async def test_a_recorded_build_replays(path: Path) -> None:
    """A build recorded on earlier code replays on this code without a non-determinism error."""
    replayer = Replayer(workflows=[ImageBuildWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history(path))


@workflow.defn(name="ImageBuild", sandboxed=False)  # the sandbox would re-import this test module
class StagingFirst:
    """The build with its first step changed: staging made before the source is resolved."""

    @workflow.run
    async def run(self, template: dict[str, Any]) -> None:
        await workflow.execute_activity("create_staging", template, start_to_close_timeout=timedelta(minutes=1))


async def test_a_changed_build_does_not_replay() -> None:
    """The histories hold the build's real commands, so a reordered step is caught."""
    replayer = Replayer(workflows=[StagingFirst], data_converter=pydantic_data_converter)
    with pytest.raises(workflow.NondeterminismError):
        await replayer.replay_workflow(history(HISTORIES / "succeeded.json"))
