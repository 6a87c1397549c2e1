"""The build's fault matrix: every step failing every way, against the recording cloud on a real dev server.

Each scenario has its own cloud, task queue and worker, and the scenarios of one kind run at once, so the time
spent waiting on retries, heartbeat timeouts and cancels overlaps. A failure names the step it happened at.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from activities import build_log
from tests.fixtures.recording_cloud import RecordingCloud, script_output
from tests.workflows.harness import (
    Harness,
    attempt_running,
    check_all,
    retried_activities,
    serving,
    unserved,
    worker_subprocess,
)
from worker import GRACEFUL_SHUTDOWN_SECONDS
from workflows.models import BuildStatus, RunState
from workflows.policies import STEP_RETRY


@dataclass(frozen=True)
class Step:
    """One step of a build, as the recording cloud and the build's status know it."""

    point: str  # the recording cloud's fault point
    name: str  # the step's name in the status (the start of it, for numbered steps)
    activity: str  # the activity type that runs it
    script: str = ""  # the run id of its guest script, after the build id
    fails_as: str = ""  # what the message of a Failed build says, when it is not the step's name

    @property
    def slug(self) -> str:
        return self.point.replace(":", "-")


STEPS = [
    Step("resolve_source", "resolve source", "resolve_source"),
    Step("create_staging", "create staging", "create_staging"),
    Step("stage_artifacts", "stage artifacts", "stage_artifacts"),
    Step("create_vm", "create build VM", "create_vm"),
    Step("customize", "customize 1/3: packages", "run_customizer", script="customization-0"),
    Step("deprovision", "deprovision", "generalize", script="customization-3"),
    Step("capture_image", "capture image", "capture_image"),
    Step("create_vm:validation", "create validation VM", "create_vm"),
    Step("validate", "validate 1/1: check", "run_customizer", script="validation-0"),
    Step("distribute", "distribute", "distribute", fails_as="Failed in distributing 3 images out of total 3"),
]
# The guest scripts of the harness's template: two Shell customizers (the File customizer, index 2, copies a
# file), the deprovision step after them, and one validator.
SCRIPTS = ["customization-0", "customization-1", "customization-3", "validation-0"]


def outputs(harness: Harness) -> list[tuple[str, str]]:
    """(kind, id) of every distribution output that exists."""
    return sorted(set(harness.cloud.alive(include_outputs=True)) - set(harness.cloud.alive()))


def all_outputs(status: BuildStatus) -> list[tuple[str, str]]:
    """What the harness's template distributes when every target succeeds: an image and a VHD named by the build,
    and a new version of the gallery's image definition, each as its run output reports it."""
    reported = {output.type: output.artifact_id for output in status.run_outputs}
    assert len(status.run_outputs) == 3
    assert reported["ManagedImage"] == f"{status.build_id}/managed"
    assert reported["VHD"] == f"{status.build_id}/vhd"
    assert "/galleries/kiln/images/debian/versions/" in reported["SharedImage"]
    return sorted(reported.items())


def assert_nothing_left(harness: Harness, status: BuildStatus) -> None:
    assert harness.cloud.alive(include_outputs=True) == [], "resources left behind"
    assert status.resources == []


async def test_a_step_failing_twice_is_retried_and_the_build_succeeds(client: Client, tmp_path: Path) -> None:
    """Retryable failures (a 500, a dropped connection) at any step cost retries, not the build."""

    async def scenario(step: Step) -> None:
        async with serving(client, tmp_path / step.slug) as h:
            h.cloud.inject(step.point, "transient", times=2)
            status = await h.finish(await h.start(h.template()))
            assert status.run_state == RunState.SUCCEEDED, status.message
            assert h.cloud.faults_taken(step.point) == 2
            assert h.cloud.alive() == []
            assert outputs(h) == all_outputs(status)
            assert status.resources == []

    await check_all({step.point: scenario(step) for step in STEPS})


async def test_a_step_that_keeps_failing_fails_the_build_when_its_retries_run_out(harness: Harness) -> None:
    """A retryable failure that never clears fails the build after STEP_RETRY's attempts, and cleans up."""
    harness.cloud.inject("create_vm", "throttled")
    status = await harness.finish(await harness.start(harness.template()))

    assert status.run_state == RunState.FAILED
    assert "create build VM failed: injected throttling at create_vm" in status.message
    assert harness.cloud.faults_taken("create_vm") == STEP_RETRY.maximum_attempts
    assert_nothing_left(harness, status)


async def test_a_fatal_failure_at_any_step_fails_the_build_and_leaves_nothing(client: Client, tmp_path: Path) -> None:
    """A non-retryable failure fails the build at once, says where, and deletes everything it made."""

    async def scenario(step: Step) -> None:
        async with serving(client, tmp_path / step.slug) as h:
            h.cloud.inject(step.point, "fatal")
            status = await h.finish(await h.start(h.template()))
            assert status.run_state == RunState.FAILED
            assert (step.fails_as or step.name) in status.message, status.message
            assert h.cloud.faults_taken(step.point) >= 1
            assert_nothing_left(h, status)
            if step.point == "distribute":  # the failed targets had made partial outputs: removed
                deleted = {id for op, id in h.cloud.events() if op == "delete"}
                assert {f"{status.build_id}/managed", f"{status.build_id}/vhd"} <= deleted
                assert any("/galleries/kiln/images/debian/versions/" in id for id in deleted)  # the claimed version

    await check_all({step.point: scenario(step) for step in STEPS})


async def stop(h: Harness, handle: WorkflowHandle[Any, Any], how: str) -> BuildStatus:
    """Cancel the build, or move its deadline to now, and return its final status."""
    if how == "cancel":
        await handle.cancel()
    else:
        await h.set_deadline(handle, 0)
    return await h.finish(handle)


# How a stopped build ends: its Temporal status, its runState, and how its message starts naming the step.
STOPPED = {
    "cancel": (WorkflowExecutionStatus.CANCELED, RunState.CANCELED, "Canceled during"),
    "deadline": (WorkflowExecutionStatus.FAILED, RunState.FAILED, "The build timed out during"),
}


async def test_a_cancel_or_the_deadline_during_any_step_stops_the_build_and_leaves_nothing(
    client: Client, tmp_path: Path
) -> None:
    """A cancel, or reaching buildTimeoutInMinutes, stops the running step (and its script in the guest), ends
    the build saying during which step, and deletes everything it made, outputs included."""

    async def scenario(how: str, step: Step) -> None:
        async with serving(client, tmp_path / how / step.slug) as h:
            h.cloud.inject(step.point, "hang", times=1)
            handle = await h.start(h.template())
            await h.wait_for_fault(step.point)
            status = await stop(h, handle, how)
            assert (await handle.describe()).status == STOPPED[how][0]
            assert status.run_state == STOPPED[how][1]
            assert f"{STOPPED[how][2]} {step.name}" in status.message, status.message
            assert_nothing_left(h, status)
            if step.script:
                assert f"{status.build_id}-{step.script}" in h.cloud.scripts_killed()

    await check_all({f"{how} during {step.point}": scenario(how, step) for how in STOPPED for step in STEPS})


@asynccontextmanager
async def worker_process(harness: Harness, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker in a process of its own serving ``harness``'s cloud; stopped on the way out if still alive."""
    async with worker_subprocess(
        harness.client, harness.task_queue, "tests.fixtures.recording_worker",
        "--db", str(harness.cloud.path),
        "--task-queue", harness.task_queue,
        "--address", harness.client.service_client.config.target_host,
        log=log,
    ) as process:  # fmt: skip
        yield process


async def test_a_build_resumes_on_a_new_worker_when_its_worker_dies_at_any_step(client: Client, tmp_path: Path) -> None:
    """A worker killed mid-step loses nothing: another worker retries that step alone, re-attaches to a script
    already running in the guest instead of running it again, and the build succeeds with nothing left over."""

    async def scenario(step: Step) -> None:
        h = unserved(client, tmp_path / step.slug)
        h.cloud.inject(step.point, "slow", times=1)
        async with worker_process(h, h.cloud.path.with_name("worker.log")) as first:
            handle = await h.start(h.template())
            await h.wait_for_fault(step.point)
            first.kill()
            await first.wait()
        async with worker_process(h, h.cloud.path.with_name("worker.log")):
            status = await h.finish(handle)

        assert status.run_state == RunState.SUCCEEDED, status.message
        assert await retried_activities(handle) == {step.activity}, "the kill did not land in the step"
        assert h.cloud.script_starts() == {
            f"{status.build_id}-{script}": 2 if script == step.script else 1 for script in SCRIPTS
        }
        assert h.cloud.alive() == []
        assert outputs(h) == all_outputs(status)
        if step.script:
            assert_whole_output_logged(h, status, step)

    await check_all({step.point: scenario(step) for step in STEPS})


async def test_a_stopped_worker_hands_its_running_step_over_at_once(client: Client, tmp_path: Path) -> None:
    """SIGTERM (systemd stopping the worker) during a long customizer: the worker leaves the script running in
    the guest and fails the step as handed over, so another worker takes it over at once, not when a heartbeat
    times out."""
    h = unserved(client, tmp_path)
    h.cloud.inject("customize", "hang", times=1)
    async with worker_process(h, tmp_path / "worker.log") as first:
        handle = await h.start(h.template())
        await h.wait_for_fault("customize")
        async with worker_process(h, tmp_path / "worker-2.log"):
            await attempt_running(handle, "run_customizer", 1)
            first.send_signal(signal.SIGTERM)
            async with asyncio.timeout(GRACEFUL_SHUTDOWN_SECONDS + 5):
                await first.wait()
                await attempt_running(handle, "run_customizer", 2)
            assert h.cloud.scripts_killed() == [], "the stopping worker stopped the script"
            await handle.cancel()
            status = await h.finish(handle)
    assert status.run_state == RunState.CANCELED
    assert h.cloud.alive(include_outputs=True) == []


def assert_whole_output_logged(harness: Harness, status: BuildStatus, step: Step) -> None:
    """The step's section of its log holds its script's output exactly once, though two workers wrote it."""
    log_name = "validation.log" if step.point == "validate" else "customization.log"
    log = (harness.cloud.logs / status.build_id / log_name).read_bytes()
    header = build_log.step_header(step.name, "shell")
    assert log.count(header) == 1, log.decode()
    section = log.split(header, 1)[1].split(build_log.note(f"{step.name}: exit code 0"), 1)[0]
    expected = script_output(f"{status.build_id}-{step.script}", RecordingCloud.SLOW_SECONDS)
    assert build_log.raw_output(section) == expected, (
        f"output lost or repeated across the worker's death:\n{section.decode()}"
    )


async def test_a_cancel_or_deadline_stops_the_build_even_if_the_running_step_then_succeeds(
    client: Client, tmp_path: Path
) -> None:
    """A step may finish before it hears of a cancel (a VM create that completes anyway); the build must still
    stop there, not run its customizers afterwards."""

    async def scenario(how: str) -> None:
        async with serving(client, tmp_path / how) as h:
            h.cloud.inject("create_vm", "slow", times=1)
            handle = await h.start(h.template())
            await h.wait_for_fault("create_vm")
            status = await stop(h, handle, how)
            assert status.run_state == STOPPED[how][1], status.message
            assert_nothing_left(h, status)
            assert h.cloud.script_starts() == {}, "customizers ran after the build was stopped"

    await check_all({how: scenario(how) for how in STOPPED})


async def test_a_cancel_or_deadline_while_the_build_vm_is_freed_leaves_nothing(client: Client, tmp_path: Path) -> None:
    """The build VM is deleted as soon as it is captured; a cancel or the deadline arriving meanwhile must neither
    leave it behind nor let the build go on to make a validation VM."""

    async def scenario(how: str) -> None:
        async with serving(client, tmp_path / how) as h:
            h.cloud.inject("delete_vm", "hang", times=1)
            handle = await h.start(h.template())
            await h.wait_for_fault("delete_vm")
            status = await stop(h, handle, how)
            assert status.run_state == STOPPED[how][1], status.message
            assert_nothing_left(h, status)
            assert f"{status.build_id}-validation" not in {id for _, id in h.cloud.events()}

    await check_all({how: scenario(how) for how in STOPPED})
