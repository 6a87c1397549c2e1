"""Builds against the recording cloud on a real dev server: a worker per test, on its own task queue."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
from temporalio.api.enums.v1 import EventType, PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from tests.fixtures.recording_cloud import RecordingCloud
from worker import run_worker
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildStatus, DeadlineRequest, RunState

SCRIPT = b"#!/bin/sh\necho configured > /tmp/configured\n"
PROJECT = Path(__file__).parents[2]
# How long a worker process may take to start polling: a loaded two-CPU machine starting several at once.
WORKER_START_SECONDS = 180


def linux_template(artifacts: Path, **properties: Any) -> dict[str, Any]:
    """A template using every Linux step: inline and scriptUri Shell, File, a validator, three targets."""
    script = artifacts / "configure.sh"
    script.write_bytes(SCRIPT)
    page = artifacts / "index.html"
    page.write_text("<h1>golden</h1>")
    sub = "/subscriptions/0000/resourceGroups/images/providers/Microsoft.Compute"
    template = {
        "location": "westeurope",
        "properties": {
            "source": {
                "type": "PlatformImage",
                "publisher": "Debian",
                "offer": "debian-12",
                "sku": "12",
                "version": "latest",
            },
            "customize": [
                {"type": "Shell", "name": "packages", "inline": ["sudo apt-get install -y tree"]},
                {
                    "type": "Shell",
                    "name": "configure",
                    "scriptUri": script.as_uri(),
                    "sha256Checksum": hashlib.sha256(SCRIPT).hexdigest(),
                },
                {"type": "File", "name": "page", "sourceUri": page.as_uri(), "destination": "/tmp/index.html"},
            ],
            "validate": {
                "inVMValidations": [{"type": "Shell", "name": "check", "inline": ["test -f /tmp/configured"]}]
            },
            "distribute": [
                {
                    "type": "ManagedImage",
                    "runOutputName": "managed",
                    "imageId": f"{sub}/images/golden",
                    "location": "westeurope",
                },
                {
                    "type": "SharedImage",
                    "runOutputName": "gallery",
                    "galleryImageId": f"{sub}/galleries/kiln/images/debian",
                    "targetRegions": [{"name": "westeurope"}, {"name": "northeurope", "replicaCount": 2}],
                },
                {"type": "VHD", "runOutputName": "vhd"},
            ],
        },
    }
    template = copy.deepcopy(template)
    template["properties"].update(properties)
    return template


async def finish(handle: WorkflowHandle[Any, Any]) -> BuildStatus:
    """Wait for the build to end, whatever its outcome, and return its final status."""
    try:
        await handle.result()
    except WorkflowFailureError:
        pass
    return await handle.query(ImageBuildWorkflow.status)


async def wait_for_step(handle: WorkflowHandle[Any, Any], prefix: str, timeout: float = 60) -> BuildStatus:
    """Wait until a step whose name starts with ``prefix`` is running."""
    async with asyncio.timeout(timeout):
        while True:
            status = await handle.query(ImageBuildWorkflow.status)
            if any(s.name.startswith(prefix) and s.outcome == "running" for s in status.steps):
                return status
            if status.run_state != RunState.RUNNING:
                raise AssertionError(f"build ended ({status.run_state}: {status.message}) before {prefix!r} ran")
            await asyncio.sleep(0.2)


@dataclass
class Harness:
    client: Client
    cloud: RecordingCloud
    task_queue: str
    artifacts: Path

    def template(self, **properties: Any) -> dict[str, Any]:
        return linux_template(self.artifacts, **properties)

    async def start(self, template: dict[str, Any], *, name: str | None = None) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            ImageBuildWorkflow.run,
            template,
            id=name or f"build-{uuid.uuid4().hex[:8]}",
            task_queue=self.task_queue,
        )

    async def finish(self, handle: WorkflowHandle[Any, Any]) -> BuildStatus:
        return await finish(handle)

    async def wait_for_step(self, handle: WorkflowHandle[Any, Any], prefix: str, timeout: float = 60) -> BuildStatus:
        return await wait_for_step(handle, prefix, timeout)

    async def wait_for_fault(self, point: str, *, times: int = 1, timeout: float = 60) -> None:
        """Wait until the fault injected at ``point`` has fired ``times`` times: the step is inside the cloud call."""
        async with asyncio.timeout(timeout):
            while self.cloud.faults_taken(point) < times:
                await asyncio.sleep(0.2)

    async def set_deadline(self, handle: WorkflowHandle[Any, Any], seconds: float) -> None:
        await handle.execute_update(ImageBuildWorkflow.set_deadline, DeadlineRequest(seconds=seconds))


async def retried_activities(handle: WorkflowHandle[Any, Any]) -> set[str]:
    """The types of the activities that needed more than one attempt, from the build's history."""
    return set(await retried_counts(handle))


async def retried_counts(handle: WorkflowHandle[Any, Any]) -> Counter[str]:
    """How many activities of each type needed more than one attempt, from the build's history."""
    types: dict[int, str] = {}
    retried: set[int] = set()
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            types[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attributes = event.activity_task_started_event_attributes
            if attributes.attempt > 1:
                retried.add(attributes.scheduled_event_id)
    return Counter(types[scheduled] for scheduled in retried)


async def attempt_running(handle: WorkflowHandle[Any, Any], activity_type: str, attempt: int) -> None:
    """Wait until an attempt ``attempt`` (or a later one) of the build's ``activity_type`` step is running."""
    while True:
        description = await handle.describe()
        for pending in description.raw_description.pending_activities:
            if (
                pending.activity_type.name == activity_type
                and pending.attempt >= attempt
                and pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            ):
                return
        await asyncio.sleep(0.05)


def unserved(client: Client, directory: Path) -> Harness:
    """A recording cloud in ``directory`` and a task queue of its own, with no worker yet."""
    artifacts = directory / "artifacts"
    artifacts.mkdir(parents=True)
    return Harness(client, RecordingCloud(directory / "cloud.db"), f"kiln-test-{uuid.uuid4()}", artifacts)


@asynccontextmanager
async def serving(client: Client, directory: Path, **worker_options: Any) -> AsyncIterator[Harness]:
    """A recording cloud in ``directory``, served by an in-process worker on a task queue of its own;
    ``worker_options`` go to ``run_worker`` (``tuning``)."""
    harness = unserved(client, directory)
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(
            client,
            harness.cloud,
            guests=harness.cloud.guests(),
            task_queue=harness.task_queue,
            stop=stop,
            **worker_options,
        )
    )
    try:
        yield harness
    finally:
        stop.set()
        await worker


@asynccontextmanager
async def worker_subprocess(
    client: Client, task_queue: str, module: str, *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m module *args``, a worker serving ``task_queue`` in a process of its own, yielded once it polls
    the queue: a query sent before then waits on no worker and times out. Stopped on the way out unless it is gone."""
    with log.open("ab") if log else nullcontext() as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *args, cwd=PROJECT, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        await polling(client, task_queue, process)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def polling(client: Client, task_queue: str, process: asyncio.subprocess.Process) -> None:
    """Wait until ``process`` polls ``task_queue`` for workflow tasks (a worker's identity starts with its pid)."""
    request = DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=TaskQueue(name=task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    )
    async with asyncio.timeout(WORKER_START_SECONDS):
        while True:
            if process.returncode is not None:
                raise AssertionError(f"the worker process exited ({process.returncode}) before it polled {task_queue}")
            pollers = (await client.workflow_service.describe_task_queue(request)).pollers
            if any(p.identity.startswith(f"{process.pid}@") for p in pollers):
                return
            await asyncio.sleep(0.2)


async def check_all(scenarios: dict[str, Coroutine[Any, Any, None]]) -> None:
    """Run the scenarios at once (their waiting overlaps) and fail naming every one that failed."""
    results = await asyncio.gather(*scenarios.values(), return_exceptions=True)
    failures = [
        f"{name}: {type(result).__name__}: {result}"
        for name, result in zip(scenarios, results, strict=True)
        if isinstance(result, BaseException)
    ]
    assert not failures, "\n".join(failures)


@pytest_asyncio.fixture
async def harness(client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    async with serving(client, tmp_path) as harness:
        yield harness
