"""Windows builds on the Azure cloud against the ARM emulator: kiln's own time per build, WinRM round trips per
step, and how soon kiln reaches a machine back from a restart.

    python bench/bench_windows.py [--builds 3] [--pause 0.05]

The environment is the one tests/azure builds Windows images in (tests/azure/environment.py): the real azure-mgmt
clients against the ARM emulator, Azurite for blobs, a Temporal dev server, and for each Windows VM a scripted
Windows machine (tests/wsman) that kiln reaches with pywinrm over WinRM/HTTPS with NTLM. The template is the
corpus's q0_helloImageTemplateWin.json (PowerShell from a scriptUri, WindowsRestart, File, inline PowerShell,
WindowsUpdate, then sysprep and a managed image); the machine offers two waves of updates, so the update step
takes three rounds and two restarts. ``--pause`` is what kiln waits between two checks of a running script or a
restarting machine (the tests' setting; Packer waits 5 s between restart checks).

(a) Each build's wall time (start_workflow to result) less the machine's scripted time (the real seconds its
    scripts slept, its restarts took, its updates installed, its sysprep ran: waiting it does on purpose) is
    kiln's own time: Temporal, the ARM emulator and the SDK, WinRM round trips, and kiln's pauses.
(b) WinRM round trips per step: HTTP requests the machine's endpoint served (NTLM's handshake included) between
    the step's start and end; each command is five (Create, Command, Receive, Signal, Delete).
(c) After each restart, the seconds from the listener coming back to the first request kiln sent it.

Example output (2 shared cores, builds 1 and 2 left out):

    (a)+(b) 3 builds of q0_helloImageTemplateWin.json, one at a time, --pause 0.05
    -- build 3 of 3
      wall   3.24 s = machine's scripted time  1.31 s + kiln  1.93 s   [Succeeded]
        step                                          wall s  WinRM requests
        resolve source                                  0.04               0
        create staging                                  0.03               0
        stage artifacts                                 0.03               0
        create build VM                                 0.06               0
        customize 1/5: CreateBuildPath                  0.14              37
        customize 2/5: WindowsRestart                   0.51              34
        customize 3/5: downloadBuildArtifacts           0.13              17
        customize 4/5: settingUpMgmtAgtPath             0.10              22
        customize 5/5: WindowsUpdate                    1.64             161
        deprovision                                     0.27              37
        capture image                                   0.05               0
        cleanup: delete build VM                        0.05               0
        distribute ManagedImage output                  0.03               0
        cleanup: delete captured image                  0.02               0
        cleanup: delete staging                         0.02               0
    (a) median over the builds: wall 3.52 s, scripted 1.31 s, kiln 2.20 s
    (c) listener back to kiln's first request, over 9 restarts: median 0.06 s, max 0.09 s

A PowerShell step of kiln's own is about 22 requests: a new connection's NTLM handshake (3), the readiness check,
the upload of the script (one ``echo`` command for a small one), its start, and a poll or two; the first step also
writes AIB's deprovisioning script (37).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from activities.clouds.local import azurite as local_azurite
from tests.azure.environment import AzureHarness, Guests, make_arm, os_profiles, prepare
from tests.services import free_port, start_dev_server
from tests.wsman import MachineSettings, Update, WindowsMachine
from workflows.models import BuildStatus

TEMPLATE = "q0_helloImageTemplateWin.json"
UPDATES = [
    Update(kb="KB5034439", title="2024-01 Servicing Stack Update (KB5034439)", wave=1),
    Update(kb="KB5034770", title="2024-02 Cumulative Update (KB5034770)", wave=2),
]


def print_build(status: BuildStatus, wall: float, machines: list[WindowsMachine]) -> dict[str, float]:
    scripted = sum(m.scripted_seconds for m in machines)
    print(
        f"  wall {wall:6.2f} s = machine's scripted time {scripted:5.2f} s + kiln {wall - scripted:5.2f} s   [{status.run_state}]"
    )
    times = sorted(t for m in machines if m.endpoint is not None for t in m.endpoint.request_times)
    print(f"    {'step':44} {'wall s':>7} {'WinRM requests':>15}")
    for step in status.steps:
        if step.ended is None:
            continue
        start, end = step.started.timestamp(), step.ended.timestamp()
        requests = sum(start <= t <= end for t in times)
        print(f"    {step.name[:44]:44} {end - start:7.2f} {requests:15}")
    return {"wall": wall, "scripted": scripted, "kiln": wall - scripted}


async def sequential(harness: AzureHarness, guests: Guests, builds: int, pause: float) -> None:
    print(f"(a)+(b) {builds} builds of {TEMPLATE}, one at a time, --pause {pause:g}")
    figures = []
    for number in range(1, builds + 1):
        started = time.monotonic()
        # A managed image of another name each time: the target must not exist yet.
        handle = await harness.start(harness.corpus(TEMPLATE, imageName=f"golden-{number}"), "bench-win")
        status = await harness.finish(handle)
        wall = time.monotonic() - started
        print(f"-- build {number} of {builds}")
        machines = [m for name, m in guests.machines.items() if name.startswith(status.build_id)]
        figures.append(print_build(status, wall, machines))
    medians = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
    print(
        f"(a) median over the builds: wall {medians['wall']:.2f} s, scripted {medians['scripted']:.2f} s, "
        f"kiln {medians['kiln']:.2f} s"
    )
    delays = [d for m in guests.machines.values() if m.endpoint is not None for d in m.endpoint.first_request_delays]
    print(
        f"(c) listener back to kiln's first request, over {len(delays)} restarts: "
        f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s"
    )


async def main(builds: int, pause: float) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-windows-") as scratch_dir:
        scratch = Path(scratch_dir)
        azurite = await local_azurite.start_azurite(location=scratch / "azurite", port=free_port())
        account = local_azurite.account_url(local_azurite.STAGING_ACCOUNT, base=azurite.endpoint)
        guests = Guests(scratch / "guests", os.urandom(32))
        guests.windows = lambda spec: MachineSettings(updates=[dataclasses.replace(u) for u in UPDATES])
        arm = make_arm(account, operation_polls=0, poll_ms=1)
        try:
            async with await start_dev_server() as env:
                arm.start()
                guests.attach(arm)
                (scratch / "artifacts").mkdir()
                harness = AzureHarness(
                    env.client,
                    arm,
                    account,
                    os.urandom(32),
                    f"kiln-windows-bench-{uuid.uuid4().hex[:8]}",
                    scratch / "artifacts",
                    [],
                )
                harness.start_worker(os_profiles(pause=pause))
                await prepare(arm.base_url)
                await sequential(harness, guests, builds, pause)
                await harness.stop_workers()
        finally:
            arm.stop()
            await asyncio.to_thread(guests.close)
            await azurite.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=3, help="builds to run, one after another")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds kiln waits between two checks")
    args = parser.parse_args()
    asyncio.run(main(args.builds, args.pause))
