"""The resume paths of long steps, run as a retry on a new worker would run them, in milliseconds.

``ActivityEnvironment`` gives an activity the info of its second attempt (and the heartbeat details the first
one left), so what a worker that takes a step over does is tested without killing any worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

from temporalio.testing import ActivityEnvironment

from activities import build_log
from activities.customize import CustomizeActivities
from activities.distribute import DistributeActivities
from tests.fixtures.recording_cloud import SCRIPT_SECONDS, RecordingCloud
from workflows.models import (
    BuildContext,
    CapturedImage,
    DistributeRequest,
    GuestScriptRequest,
    ResolvedSource,
    RunOutput,
    Staging,
    VmSpec,
)
from workflows.template import ShellCustomizer, VhdDistributor, VmProfile

BUILD = BuildContext(build_id="resume-1", template_name="resume", location="westeurope", cloud="recording")


def second_attempt(**changes: Any) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(ActivityEnvironment.default_info(), attempt=2, **changes)
    return env


async def test_a_retried_customizer_reads_on_where_the_dead_worker_stopped(tmp_path: Path) -> None:
    cloud = RecordingCloud(tmp_path / "cloud.db")
    staging = await cloud.create_staging(BUILD)
    spec = VmSpec(
        name="resume-1-build",
        purpose="build",
        image_id="source",
        source=ResolvedSource(image_id="source", exact_version="1"),
        vm_profile=VmProfile(),
    )
    vm = await cloud.create_vm(BUILD, staging, spec)
    request = GuestScriptRequest(
        build=BUILD,
        staging=staging,
        vm=vm,
        index=0,
        label="customize 1/1: long",
        step=ShellCustomizer(type="Shell", name="long", inline=["sleep 1"]),
    )
    run_id = "resume-1-customization-0"
    # What the first attempt did before its worker died: wrote the step's header, started the script, and copied
    # the first lines of its output into the log.
    log = await cloud.open_log(BUILD, staging, "customization.log")
    guests = cloud.guests()
    async with guests.connect(vm, build_id=BUILD.build_id, secret=cloud.secret) as guest:
        await guest.start_script(run_id, "sleep 1")
        await asyncio.sleep(SCRIPT_SECONDS / 2)
        first = (await guest.poll_script(run_id, 0)).output
    await log.append(build_log.step_header(request.label, "shell") + build_log.OutputFramer().frame(first))
    assert first and b"exit code" not in first

    env = second_attempt()
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    result = await env.run(CustomizeActivities(cloud, guests).run_customizer, request)

    assert result.exit_code == 0 and beats
    text = (await log.read()).decode()
    lines = re.findall(rf"{run_id} line (\d+)", text)
    assert lines == [str(i) for i in range(len(lines))], "a line was lost or written twice"
    assert len(lines) == int(SCRIPT_SECONDS * 4) + 1
    assert text.count(build_log.step_header(request.label, "shell").decode()) == 1
    assert text.endswith(f"==> azure-arm: {request.label}: exit code 0\n(telemetry) ending shell\n")


class ResumingCloud:
    """The one call the distribute activity makes: what a cloud is handed on a retry, and what it reports."""

    def __init__(self) -> None:
        self.resumed_from: dict[str, Any] | None = None

    async def distribute(self, request: DistributeRequest, *, resume: dict[str, Any] | None, progress) -> RunOutput:
        self.resumed_from = dict(resume) if resume is not None else None
        progress({"operation": "op-42", "polled": (resume or {}).get("polled", 0) + 1})
        return RunOutput(run_output_name=request.target.run_output_name, type="VHD", artifact_uri="vhd://done")


async def test_a_retried_distribution_picks_up_its_operation_from_the_heartbeat() -> None:
    cloud = ResumingCloud()
    request = DistributeRequest(
        build=BUILD,
        staging=Staging(resource_group_id="rg", created_group=True, storage_uri="", log_uri_prefix=""),
        image=CapturedImage(id="image"),
        source=ResolvedSource(image_id="source", exact_version="1"),
        target=VhdDistributor(type="VHD", run_output_name="vhd"),
        index=0,
    )
    # The pydantic converter hands heartbeat details back as plain dicts.
    env = second_attempt(heartbeat_details=[{"operation": "op-42", "polled": 3}])
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    output = await env.run(DistributeActivities(cloud, None).distribute, request)  # type: ignore[arg-type]

    assert cloud.resumed_from == {"operation": "op-42", "polled": 3}
    assert output.artifact_uri == "vhd://done"
    # The new resume point is heartbeated at once, so a third worker would carry on from it.
    assert ({"operation": "op-42", "polled": 4},) in beats
