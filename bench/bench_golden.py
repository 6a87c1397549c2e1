"""What golden images over time cost Temporal and a worker: history growth per week of an idle template entity
(with and without a SourceImage trigger) and of a weekly schedule, and worker memory for 1,000 idle templates.

    python bench/bench_golden.py [--templates 1000]

Starts its own dev servers (one with per-workflow time skipping, so a week passes in seconds) and serves
builds with the recording cloud in worker processes of their own; prints, does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from temporalio.client import Client, WorkflowHandle  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402

from cli.templates import create_template, schedule_of  # noqa: E402
from tests.fixtures.recording_cloud import RecordingCloud  # noqa: E402
from tests.services import temporal_cli  # noqa: E402
from tests.workflows.harness import linux_template  # noqa: E402
from worker import run_worker  # noqa: E402
from workflows.golden_models import RunRequest, TriggerRequest  # noqa: E402
from workflows.image_template import ImageTemplateWorkflow  # noqa: E402
from workflows.models import SEARCH_ATTRIBUTES  # noqa: E402

WEEK = timedelta(days=7)
TIME_SKIPPING = ["--dynamic-config-value", "frontend.WorkflowTimeSkippingEnabled=true"]
PROJECT = Path(__file__).resolve().parents[1]


async def history_length(handle: WorkflowHandle) -> int:
    """Events in the workflow's current run."""
    return (await handle.describe()).raw_description.workflow_execution_info.history_length


async def dev_server(*, time_skipping: bool = False) -> WorkflowEnvironment:
    """A dev server of the bench's own; with ``time_skipping``, one whose workflows' clocks can be moved on."""
    options = dict(
        dev_server_existing_path=temporal_cli(),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_log_level="error",
    )
    if time_skipping:
        return await WorkflowEnvironment.start_time_skipping_v2(dev_server_extra_args=TIME_SKIPPING, **options)
    return await WorkflowEnvironment.start_local(**options)


async def served(client: Client, directory: Path, queue: str) -> tuple[asyncio.Event, asyncio.Task[None]]:
    cloud = RecordingCloud(directory / "cloud.db")
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(client, cloud, guests=cloud.guests(), task_queue=queue, stop=stop))
    return stop, task


async def idle_week(directory: Path) -> None:
    async with await dev_server(time_skipping=True) as env:
        queue = f"bench-{uuid.uuid4()}"
        stop, worker = await served(env.client, directory, queue)
        artifacts = directory / "artifacts"
        artifacts.mkdir(exist_ok=True)
        template = linux_template(artifacts)
        for label, trigger in (("idle template", None), ("template with an hourly trigger", 3600.0)):
            handle = await create_template(
                env.client, f"bench-{uuid.uuid4().hex[:6]}", template, cloud="recording", task_queue=queue
            )
            if trigger:
                await handle.execute_update(
                    ImageTemplateWorkflow.create_trigger, TriggerRequest(interval_seconds=trigger)
                )
            await asyncio.sleep(1)
            before = await history_length(handle)
            started = time.monotonic()
            await env.fast_forward(handle, WEEK)
            after = await history_length(handle)
            virtual = await env.get_current_time(handle)
            print(
                f"{label}: {after - before} history events in one week of virtual time "
                f"(took {time.monotonic() - started:.1f} s; entity clock now {virtual:%Y-%m-%d %H:%M})"
            )
        stop.set()
        await worker


async def weekly_schedule(directory: Path) -> None:
    """A schedule's week is one run: what that run writes (its own workflow, and the entity's part)."""
    async with await dev_server() as env:
        queue = f"bench-{uuid.uuid4()}"
        stop, worker = await served(env.client, directory, queue)
        artifacts = directory / "artifacts-schedule"
        artifacts.mkdir(exist_ok=True)
        name = f"bench-{uuid.uuid4().hex[:6]}"
        entity = await create_template(env.client, name, linux_template(artifacts), cloud="recording", task_queue=queue)
        await entity.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
        while not (await entity.query(ImageTemplateWorkflow.describe)).runs[0].finished:
            await asyncio.sleep(0.3)
        schedule = await env.client.create_schedule(
            f"{name}-weekly",
            schedule_of(
                name=f"{name}-weekly", template=name, task_queue=queue, cron="0 3 * * 0", when="source-changed"
            ),
        )
        for outcome in ("skipped (source unchanged)", "built (source changed)"):
            if outcome.startswith("built"):
                RecordingCloud(directory / "cloud.db").publish_source_version("9.9.9")
            before = await history_length(entity)
            count = len((await schedule.describe()).info.recent_actions)
            await schedule.trigger()
            while len((info := (await schedule.describe()).info).recent_actions) <= count:
                await asyncio.sleep(0.3)
            action = info.recent_actions[-1].action
            run = env.client.get_workflow_handle(action.workflow_id, run_id=action.first_execution_run_id)
            await run.result()
            events = (await run.describe()).raw_description.workflow_execution_info.history_length
            await asyncio.sleep(1)
            print(
                f"weekly schedule, one run {outcome}: {events} events in the run's own workflow, "
                f"{await history_length(entity) - before} in the template's entity"
            )
        await schedule.delete()
        stop.set()
        await worker


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def idle_templates(directory: Path, count: int) -> None:
    async with await dev_server() as env:
        queue = f"bench-{uuid.uuid4()}"
        address = env.client.service_client.config.target_host
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.fixtures.recording_worker",
            "--db", str(directory / "memory.db"), "--task-queue", queue, "--address", address,
            cwd=PROJECT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await asyncio.sleep(5)
            baseline = rss_mib(worker.pid)
            artifacts = directory / "artifacts-memory"
            artifacts.mkdir(exist_ok=True)
            template = linux_template(artifacts)
            started = time.monotonic()
            handles = []
            for batch in range(0, count, 50):
                handles += await asyncio.gather(
                    *(
                        create_template(env.client, f"idle-{i}", template, cloud="recording", task_queue=queue)
                        for i in range(batch, min(batch + 50, count))
                    )
                )
            # A query needs the entity in the worker's cache (or a replay): ask each once, as `kiln template list` does.
            for batch in range(0, count, 50):
                await asyncio.gather(*(h.query(ImageTemplateWorkflow.describe) for h in handles[batch : batch + 50]))
            took = time.monotonic() - started
            await asyncio.sleep(3)
            loaded = rss_mib(worker.pid)
            print(
                f"{count} idle templates: worker RSS {baseline:.0f} MiB before, {loaded:.0f} MiB after "
                f"({(loaded - baseline) * 1024 / count:.0f} KiB a template); created and queried in {took:.0f} s"
            )
        finally:
            worker.terminate()
            await worker.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", type=int, default=1000, help="idle templates for the memory figure")
    args = parser.parse_args()
    print(f"bench_golden {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        await idle_week(directory)
        await weekly_schedule(directory)
        await idle_templates(directory, args.templates)


if __name__ == "__main__":
    asyncio.run(main())
