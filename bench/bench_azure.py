"""The Azure cloud against the ARM emulator: kiln's overhead per build, ARM calls per build, builds in flight.

    python bench/bench_azure.py [--builds 3] [--in-flight 50] [--sleep 5]

The environment is the one tests/azure builds in (tests/azure/environment.py): the real azure-mgmt clients against
the ARM emulator, Azurite for blobs, a real SSH guest per VM, a Temporal dev server; it needs root and overlayfs
over /. The emulator injects no delay: every long-running operation ends at its first poll, and the poll hint
(retry-after-ms) is 1 ms. The template is the corpus's q0_helloImageTemplateLinux.json (Ubuntu platform image,
five customizers, a managed image).

(a) Each build's wall time (start_workflow to result) is split by what the emulator's own call log says
(`Call.at`, `Call.seconds`: request read to answer ready, server side):
  ARM      the union of the intervals in which the emulator was answering at least one request; a VM PUT holds
           the boot of its SSH guest, shown apart;
  polling  one 1 ms poll hint per long-running-operation poll, slept by the SDK;
  kiln     the rest: Temporal (workflow tasks, activity dispatch, history), the SDK's client side, SSH to the
           guest and the scripts' run time there, and blob transfers with Azurite. The step table shows where.
(b) ARM calls of one build, by method and resource type, from `ArmEmulator.calls`.
(c) `--in-flight` builds started at once on one worker (a child process, so its memory is the worker's alone),
a `sleep` customizer first so they overlap; its VmRSS is sampled from /proc, its peak read from VmHWM.

Example output (2 shared cores, builds 1 and 2 left out):

    (a)+(b) 3 builds of q0_helloImageTemplateLinux.json, one at a time, on an in-process worker
    -- build 3 of 3
      wall   2.35 s = ARM  0.18 s (of which VM PUT with guest boot 0.12 s) + polling 0.02 s (20 polls) + kiln  2.15 s   [Succeeded]
        step                                          wall s  ARM s  rest s
        resolve source                                  0.05   0.00    0.05
        create staging                                  0.05   0.00    0.05
        stage artifacts                                 0.05   0.00    0.05
        create build VM                                 0.24   0.12    0.12
        customize 1/5: RunScriptFromSource              0.14   0.00    0.14
        customize 2/5: CheckSumCompareShellScript       0.15   0.00    0.15
        customize 3/5: downloadBuildArtifacts           0.13   0.00    0.13
        customize 4/5: setupBuildPath                   0.17   0.00    0.17
        customize 5/5: InstallUpgrades                  0.16   0.00    0.16
        deprovision                                     0.69   0.00    0.69
        capture image                                   0.10   0.00    0.10
        cleanup: delete build VM                        0.12   0.05    0.07
        distribute ManagedImage output                  0.04   0.00    0.04
        cleanup: delete captured image                  0.04   0.00    0.04
        cleanup: delete staging                         0.04   0.00    0.04
    (b) ARM calls of build 3
      60 ARM calls; by resource type and method:
          11  GET    Microsoft.Compute operation (poll)
           1  DELETE Microsoft.Compute/disks
           1  DELETE Microsoft.Compute/images
           4  GET    Microsoft.Compute/images
           2  PUT    Microsoft.Compute/images
           1  DELETE Microsoft.Compute/snapshots
           1  GET    Microsoft.Compute/snapshots
           1  PUT    Microsoft.Compute/snapshots
           1  DELETE Microsoft.Compute/virtualMachines
           3  GET    Microsoft.Compute/virtualMachines
           1  PUT    Microsoft.Compute/virtualMachines
           1  POST   Microsoft.Compute/virtualMachines/deallocate
           1  POST   Microsoft.Compute/virtualMachines/generalize
           1  POST   Microsoft.Compute/virtualMachines/runCommand
           3  GET    Microsoft.Compute/vmimage versions
           7  GET    Microsoft.Network operation (poll)
           1  DELETE Microsoft.Network/networkInterfaces
           1  GET    Microsoft.Network/networkInterfaces
           1  PUT    Microsoft.Network/networkInterfaces
           1  DELETE Microsoft.Network/networkSecurityGroups
           1  GET    Microsoft.Network/networkSecurityGroups
           1  PUT    Microsoft.Network/networkSecurityGroups
           1  DELETE Microsoft.Network/publicIPAddresses
           2  GET    Microsoft.Network/publicIPAddresses
           1  PUT    Microsoft.Network/publicIPAddresses
           1  DELETE Microsoft.Network/virtualNetworks
           1  GET    Microsoft.Network/virtualNetworks
           1  PUT    Microsoft.Network/virtualNetworks
           1  GET    Microsoft.Resources operation (poll)
           1  DELETE Microsoft.Resources/resourceGroups
           2  GET    Microsoft.Resources/resourceGroups
           1  PUT    Microsoft.Resources/resourceGroups
           1  GET    Microsoft.Storage operation (poll)
           1  PUT    Microsoft.Storage/storageAccounts
      by method: DELETE 9, GET 38, POST 3, PUT 10
      by status: 200 35, 201 8, 202 11, 204 2, 404 4
    (a) median over the builds: wall 2.35 s, arm 0.18 s, boot 0.12 s, polling 0.02 s, kiln 2.15 s
    (c) 50 builds of q0_helloImageTemplateLinux.json with a first customizer 'sleep 5', started at once on one worker
      outcomes: {'Succeeded': 50}; at most 47 builds in the sleep customizer at once
      total wall time (first start to last result): 77.7 s
      worker RSS idle 192.9 MiB, highest sample 228.8 MiB, peak (VmHWM) 228.7 MiB
      memory per in-flight build: (peak - idle) / 50 = 0.72 MiB
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.clouds.local import azurite as local_azurite
from tests.arm_emulator import Call
from tests.azure.environment import AzureHarness, Guests, guests_supported, make_arm, make_cloud, prepare
from tests.services import free_port, start_dev_server
from worker import WorkerTuning, run_worker
from workflows.models import BuildStatus, RunState

TEMPLATE = "q0_helloImageTemplateLinux.json"
POLL_MS = 1


# ---------------------------------------------------------------------------------------------- (a) and (b)


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(spans: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in spans)


def is_poll(call: Call) -> bool:
    return bool(re.search(r"/(operations|operationresults)/", call.path, re.IGNORECASE))


def is_vm_put(call: Call) -> bool:
    return call.method == "PUT" and re.search(r"/virtualMachines/[^/]+$", call.path, re.IGNORECASE) is not None


def resource_type(path: str) -> str:
    """What a call addresses: `Namespace/type[/child]`, an action as `type/action`, polls by namespace."""
    segs = [s for s in path.split("/") if s]
    low = [s.lower() for s in segs]
    if "providers" not in low:
        if "operationresults" in low:
            return "Microsoft.Resources operation (poll)"
        return "Microsoft.Resources/resourceGroups" if "resourcegroups" in low else "/".join(segs[2:]) or path
    at = low.index("providers")
    ns, rest = segs[at + 1], segs[at + 2 :]
    if rest and rest[0].lower() == "locations":
        if len(rest) > 2 and rest[2].lower() in ("operations", "operationresults"):
            return f"{ns} operation (poll)"
        return f"{ns}/vmimage versions"
    types = rest[0::2]
    return f"{ns}/{'/'.join(types)}"


def print_build(status: BuildStatus, wall: float, calls: list[Call], started: float) -> dict[str, float]:
    spans = union([(c.at, c.at + c.seconds) for c in calls])
    arm = covered(spans, started, started + wall)
    boot = sum(c.seconds for c in calls if is_vm_put(c))
    polls = sum(1 for c in calls if is_poll(c))
    polling = polls * POLL_MS / 1000
    kiln = wall - arm - polling
    print(
        f"  wall {wall:6.2f} s = ARM {arm:5.2f} s (of which VM PUT with guest boot {boot:4.2f} s)"
        f" + polling {polling:4.2f} s ({polls} polls) + kiln {kiln:5.2f} s   [{status.run_state}]"
    )
    print(f"    {'step':44} {'wall s':>7} {'ARM s':>6} {'rest s':>7}")
    for step in status.steps:
        if step.ended is None:
            continue
        start, end = step.started.timestamp(), step.ended.timestamp()
        in_arm = covered(spans, start, end)
        print(f"    {step.name[:44]:44} {end - start:7.2f} {in_arm:6.2f} {end - start - in_arm:7.2f}")
    return {"wall": wall, "arm": arm, "boot": boot, "polling": polling, "kiln": kiln}


def print_calls(calls: list[Call]) -> None:
    by_kind = Counter((resource_type(c.path), c.method) for c in calls)
    print(f"  {len(calls)} ARM calls; by resource type and method:")
    for (kind, method), count in sorted(by_kind.items()):
        print(f"    {count:4}  {method:6} {kind}")
    by_method = Counter(c.method for c in calls)
    print("  by method: " + ", ".join(f"{m} {n}" for m, n in sorted(by_method.items())))
    statuses = Counter(c.status for c in calls)
    print("  by status: " + ", ".join(f"{s} {n}" for s, n in sorted(statuses.items())))


async def sequential(harness: AzureHarness, builds: int) -> None:
    print(f"(a)+(b) {builds} builds of {TEMPLATE}, one at a time, on an in-process worker")
    figures = []
    for run in range(builds):
        template = harness.corpus(TEMPLATE, imageName=f"golden{run}")
        first = len(harness.arm.calls)
        started, clock = time.time(), time.perf_counter()
        status = await harness.finish(await harness.start(template, f"bench-{run}"))
        wall = time.perf_counter() - clock
        calls = harness.arm.calls[first:]
        print(f"-- build {run + 1} of {builds}")
        figures.append(print_build(status, wall, calls, started))
        if run == builds - 1:
            print(f"(b) ARM calls of build {run + 1}")
            print_calls(calls)
    if builds > 1:
        print(
            "(a) median over the builds: "
            + ", ".join(f"{key} {statistics.median(f[key] for f in figures):.2f} s" for key in figures[0])
        )


# ---------------------------------------------------------------------------------------------- (c)


def worker_process(
    target: str, task_queue: str, arm_url: str, blob_account: str, secret: bytes, tuning: WorkerTuning | None = None
) -> None:
    """One kiln worker on its own, as `python worker.py --cloud azure` would run, pointed at the emulator."""

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        client = await Client.connect(target, data_converter=pydantic_data_converter)
        cloud = make_cloud(arm_url, blob_account, secret=secret)
        try:
            await run_worker(client, cloud, task_queue=task_queue, stop=stop, tuning=tuning or WorkerTuning())
        finally:
            await cloud.close()

    asyncio.run(serve())


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, delta in edges:
        now += delta
        best = max(best, now)
    return best


async def in_flight(harness: AzureHarness, target: str, count: int, sleep: int) -> None:
    print(f"(c) {count} builds of {TEMPLATE} with a first customizer 'sleep {sleep}', started at once on one worker")
    task_queue = f"kiln-azure-bench-{uuid.uuid4().hex[:8]}"
    child = multiprocessing.get_context("spawn").Process(
        target=worker_process, args=(target, task_queue, harness.arm.base_url, harness.blob_account, harness.secret)
    )
    child.start()
    try:
        await asyncio.sleep(5)  # imports, connect, first polls: the worker idles from here on
        idle = memory_kib(child.pid, "VmRSS")
        samples = [idle]
        handles = []
        clock = time.perf_counter()
        for index in range(count):
            template = harness.corpus(TEMPLATE, imageName=f"flight{index}")
            template["properties"]["customize"].insert(
                0, {"type": "Shell", "name": "overlap", "inline": [f"sleep {sleep}"]}
            )
            handles.append(
                await harness.client.start_workflow(
                    "ImageBuild", template, id=f"flight-{index}-{uuid.uuid4().hex[:6]}", task_queue=task_queue
                )
            )

        async def sample() -> None:
            while True:
                samples.append(memory_kib(child.pid, "VmRSS"))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        statuses = await asyncio.gather(*(harness.finish(h) for h in handles))
        wall = time.perf_counter() - clock
        sampler.cancel()
        peak = memory_kib(child.pid, "VmHWM")
    finally:
        os.kill(child.pid, signal.SIGTERM)
        child.join(30)
    states = Counter(str(s.run_state) for s in statuses)
    sleeping = [
        (s.started.timestamp(), s.ended.timestamp())
        for st in statuses
        for s in st.steps
        if s.name.startswith("customize 1/") and s.ended is not None
    ]
    print(f"  outcomes: {dict(states)}; at most {max_overlap(sleeping)} builds in the sleep customizer at once")
    print(f"  total wall time (first start to last result): {wall:.1f} s")
    print(
        f"  worker RSS idle {idle / 1024:.1f} MiB, highest sample {max(samples) / 1024:.1f} MiB, "
        f"peak (VmHWM) {peak / 1024:.1f} MiB"
    )
    print(f"  memory per in-flight build: (peak - idle) / {count} = {(peak - idle) / count / 1024:.2f} MiB")
    failed = [s for s in statuses if s.run_state != RunState.SUCCEEDED]
    for status in failed[:3]:
        print(f"  failed: {status.build_id}: {status.message}")


# ---------------------------------------------------------------------------------------------- main


async def main(builds: int, count: int, sleep: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-azure-") as scratch_dir:
        scratch = Path(scratch_dir)
        if not await guests_supported(scratch):
            raise SystemExit("real SSH guests need root and overlayfs over /")
        azurite = await local_azurite.start_azurite(location=scratch / "azurite", port=free_port())
        guests = Guests(scratch / "guests", os.urandom(32))
        arm = make_arm(
            local_azurite.account_url(local_azurite.STAGING_ACCOUNT, base=azurite.endpoint),
            operation_polls=0,
            poll_ms=POLL_MS,
        )
        try:
            async with await start_dev_server() as env:
                arm.start()
                guests.attach(arm)
                (scratch / "artifacts").mkdir()
                harness = AzureHarness(
                    env.client,
                    arm,
                    local_azurite.account_url(local_azurite.STAGING_ACCOUNT, base=azurite.endpoint),
                    os.urandom(32),
                    f"kiln-azure-bench-{uuid.uuid4().hex[:8]}",
                    scratch / "artifacts",
                    [],
                )
                harness.start_worker()
                await prepare(arm.base_url)
                await sequential(harness, builds)
                await harness.stop_workers()
                if count:
                    await in_flight(harness, env.client.service_client.config.target_host, count, sleep)
        finally:
            arm.stop()
            await asyncio.to_thread(guests.close)
            await azurite.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=3, help="builds for (a) and (b), one after another")
    parser.add_argument("--in-flight", type=int, default=50, help="builds started at once for (c); 0 skips it")
    parser.add_argument("--sleep", type=int, default=5, help="seconds the first customizer of (c) sleeps")
    args = parser.parse_args()
    asyncio.run(main(args.builds, args.in_flight, args.sleep))
