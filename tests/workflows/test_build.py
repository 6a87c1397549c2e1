"""The build saga end to end against the recording cloud: outcomes, and what is left afterwards."""

from __future__ import annotations

from tests.workflows.harness import Harness
from workflows.models import RunState


async def test_build_succeeds_and_leaves_only_its_outputs(harness: Harness) -> None:
    status = await harness.finish(await harness.start(harness.template()))

    assert status.run_state == RunState.SUCCEEDED, status.message
    assert [o.run_output_name for o in sorted(status.run_outputs, key=lambda o: o.run_output_name)] == [
        "gallery",
        "managed",
        "vhd",
    ]
    assert harness.cloud.alive() == []
    assert len(harness.cloud.alive(include_outputs=True)) == 3
    assert status.resources == []
    assert status.source_exact_version == "1.0.0"
    assert [s.outcome for s in status.steps if s.outcome != "succeeded"] == []
