"""How long a build step waits after its worker goes away before it runs again on another worker.

    python bench/bench_recovery.py [--runs 3]

A build on the recording cloud (tests/fixtures) runs a customizer that never ends, on a worker process of its
own; a second worker already serves the same queue. The first worker is then SIGKILLed (it dies as a crash
does) or SIGTERMed (it stops as systemd stops it). The figure is the time from the signal to the moment the step
is running again on the second worker (its next attempt started), read from the server's view of the build.
A real Temporal dev server; no VM is made, so the figure is kiln's and Temporal's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table
from temporalio.client import Client

from tests.fixtures.recording_cloud import RecordingCloud
from tests.services import start_dev_server
from tests.workflows.harness import attempt_running, linux_template, wait_for_step
from workflows.build import ImageBuildWorkflow

PROJECT = Path(__file__).resolve().parents[1]


async def worker(client: Client, cloud: RecordingCloud, queue: str, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.fixtures.recording_worker", "--db", str(cloud.path), "--task-queue", queue,
            "--address", client.service_client.config.target_host, cwd=PROJECT, stdout=out, stderr=out,
        )  # fmt: skip


async def one_run(client: Client, folder: Path, how: signal.Signals) -> float:
    """Seconds from ``how`` reaching the step's worker to the step running again on the other one."""
    cloud = RecordingCloud(folder / "cloud.db")
    queue = f"kiln-bench-{uuid.uuid4()}"
    artifacts = folder / "artifacts"
    artifacts.mkdir()
    cloud.inject("customize", "hang", times=1)
    first = await worker(client, cloud, queue, folder / "worker-1.log")
    handle = await client.start_workflow(
        ImageBuildWorkflow.run, linux_template(artifacts), id=f"bench-{uuid.uuid4().hex[:8]}", task_queue=queue
    )
    await wait_for_step(handle, "customize", timeout=120)
    await attempt_running(handle, "run_customizer", 1)
    second = await worker(client, cloud, queue, folder / "worker-2.log")
    await asyncio.sleep(3)  # the second worker is up and polling
    try:
        signalled = time.monotonic()
        first.send_signal(how)
        await asyncio.wait_for(attempt_running(handle, "run_customizer", 2), timeout=120)
        seconds = time.monotonic() - signalled
    finally:
        await handle.cancel()
        for process in (first, second):
            if process.returncode is None:
                process.kill()
            await process.wait()
    return seconds


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-recovery-") as scratch:
        async with await start_dev_server() as env:
            figures: dict[str, list[float]] = {}
            for how in (signal.SIGKILL, signal.SIGTERM):
                for run in range(runs):
                    folder = Path(scratch) / f"{how.name}-{run}"
                    folder.mkdir()
                    figures.setdefault(how.name, []).append(await one_run(env.client, folder, how))
    table = Table("worker gets", "runs", "step running again after (median)", "min", "max")
    for name, seconds in figures.items():
        table.add_row(
            name, str(len(seconds)), f"{statistics.median(seconds):.1f} s", f"{min(seconds):.1f} s",
            f"{max(seconds):.1f} s",
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
