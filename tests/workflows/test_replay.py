"""Recorded build histories replay on today's ImageBuildWorkflow: a change that would break the builds running
when it is deployed (a step added, removed or reordered without ``workflow.patched``) fails here, and so does
one that makes a stricter template rule change how a recorded build replays.
How to re-record: ``tests/histories/record.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import InitErrorDetails, PydanticCustomError
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.histories.record import BUILDS, HISTORIES
from workflows.build import ImageBuildWorkflow
from workflows.template import TemplateError, TemplateProperties, parse_template

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


@pytest.fixture
def stricter_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """A template rule added after the histories were recorded: at most two distribution targets. The template
    every recorded build ran has three."""
    earlier = TemplateProperties._rules

    def rules(cls: type[TemplateProperties], data: dict) -> Iterator[InitErrorDetails]:
        yield from earlier(data)
        targets = data.get("distribute")
        if isinstance(targets, list) and len(targets) > 2:
            yield InitErrorDetails(
                type=PydanticCustomError("rule", "At most two distribution targets."), loc=("distribute",), input=data
            )

    monkeypatch.setattr(TemplateProperties, "_rules", classmethod(rules))


def template_of(recorded: WorkflowHistory) -> dict[str, Any]:
    """The template a recorded build was started with."""
    started = recorded.events[0].workflow_execution_started_event_attributes
    return json.loads(started.input.payloads[0].data)


@pytest.mark.usefixtures("stricter_rule")
async def test_a_build_that_recorded_its_validation_replays_past_a_stricter_rule() -> None:
    """Its template is judged by the rules of the worker that validated it, however stricter they are since."""
    recorded = history(HISTORIES / "validation-recorded.json")
    with pytest.raises(TemplateError, match="At most two distribution targets"):
        parse_template(template_of(recorded))
    replayer = Replayer(workflows=[ImageBuildWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(recorded)


@pytest.mark.usefixtures("stricter_rule")
async def test_a_build_that_validated_in_workflow_code_does_not_replay_past_a_stricter_rule() -> None:
    """Why validation moved into a local activity: a build recorded when the workflow parsed its template
    replays to a refused template, and fails as non-deterministic."""
    recorded = history(HISTORIES / "succeeded.json")
    with pytest.raises(TemplateError, match="At most two distribution targets"):
        parse_template(template_of(recorded))
    replayer = Replayer(workflows=[ImageBuildWorkflow], data_converter=pydantic_data_converter)
    with pytest.raises(workflow.NondeterminismError):
        await replayer.replay_workflow(recorded)
