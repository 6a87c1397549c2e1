"""A chaos soak of real local builds: many, several at a time, a random mix of outcomes, workers killed and stopped
meanwhile.

Each build is meant to end one way: Succeeded (its customizer writes a token the image must hold), Failed in a
customizer, Canceled mid-script, or Failed at its deadline mid-script. While they run, the worker serving them is
SIGKILLed at random moments (a new one is started at once), and a second worker joins and is stopped again
(SIGTERM), so steps are taken over both ways; Azurite, which holds every build's staged files, logs and outputs, is
stopped and started again; and a build VM's SSH connections are cut (its sshd session processes killed) while a
step uses them. At the end every build is checked: its runState is the one meant,
a succeeded image holds its customization, and nothing temporary of it is left on the machine (processes,
mounts, folders, cgroups, loopback listeners, records, blobs). ``bench/chaos.py`` runs it at any size and
``tests/local/test_chaos.py`` runs a short one.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table
from temporalio.client import Client
from temporalio.service import RPCError

from activities.clouds.base import PermanentError
from activities.clouds.local.admin import read_log
from activities.clouds.local.azurite import Azurite, start_azurite
from activities.clouds.local.records import ResourceStore
from tests.local.builds import (
    Build,
    LocalBuilds,
    debugfs,
    download_vhd,
    host_processes,
    serving,
    shell,
    template,
    worker_process,
)
from tests.local.vms import TEST_HOME, pid_namespace_members
from tests.services import free_port
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildStatus, RunState

# What each kind of build is meant to end as.
MEANT = {
    "succeed": RunState.SUCCEEDED,
    "fail": RunState.FAILED,
    "cancel": RunState.CANCELED,
    "timeout": RunState.FAILED,
}
MARKER = "/etc/kiln-chaos"
# Seconds a cancelled or timed-out build's script would run if nothing stopped it.
LONG_SCRIPT_SECONDS = 600
# Seconds Azurite stays down when the soak restarts it.
STORAGE_DOWN_SECONDS = (1.0, 5.0)


@dataclass
class Planned:
    kind: str
    build: Build
    token: str
    status: BuildStatus | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Faults:
    """What the soak does to the builds' surroundings, in all, while they run."""

    kills: int = 0  # SIGKILLs of the worker serving them
    storage_restarts: int = 0  # Azurite stopped, and started again on its port and data
    ssh_drops: int = 0  # a build VM's SSH sessions cut


@dataclass
class Chaos:
    """What the soak did."""

    kills: int = 0
    stops: int = 0
    storage_restarts: int = 0
    ssh_drops: int = 0
    workers: list[asyncio.subprocess.Process] = field(default_factory=list)


@dataclass
class Storage:
    """The soak's own Azurite, which it restarts: stopped (SIGTERM, as a service is), down a while, then started
    again on the same port with the same data, as a restarted storage service comes back."""

    azurite: Azurite

    async def restart(self, down: float) -> None:
        port = urllib.parse.urlparse(self.azurite.endpoint).port
        await self.azurite.stop()
        await asyncio.sleep(down)
        self.azurite = await start_azurite(location=self.azurite.location, port=port)


@asynccontextmanager
async def environment(client: Client, folder: Path) -> AsyncIterator[tuple[LocalBuilds, Storage]]:
    """Local builds on the cached base, with an Azurite of their own the soak may restart."""
    (folder / "files").mkdir()
    storage = Storage(await start_azurite(location=folder / "azurite", port=free_port()))
    try:
        store = ResourceStore(TEST_HOME / "resources.db")
        async with serving(client, storage.azurite.endpoint, TEST_HOME, store, folder / "files") as builds:
            yield builds, storage
    finally:
        await storage.azurite.stop()


def plan(count: int, rng: random.Random) -> list[str]:
    """``count`` kinds of build: every kind at least once when there is room, the rest at random, shuffled."""
    kinds = list(MEANT)[:count] + [rng.choice(list(MEANT)) for _ in range(max(0, count - len(MEANT)))]
    rng.shuffle(kinds)
    return kinds


def template_for(kind: str, token: str, rng: random.Random) -> dict:
    if kind == "succeed":
        pause = rng.choice([0, 1, 3, 6])
        return template([shell("mark", "echo 'mark: started'", f"sleep {pause}", f"echo {token} | sudo tee {MARKER}")])
    if kind == "fail":
        return template([shell("fails", "echo 'fails: started'", f"sleep {rng.choice([0, 2, 5])}", "exit 3")])
    return template([shell("long", "echo 'long: started'", f"sleep {LONG_SCRIPT_SECONDS}", "echo 'long: never'")])


async def status_of(build: Build) -> BuildStatus | None:
    """The build's status, or None while no worker answers queries (one was just killed)."""
    with suppress(RPCError):
        return await build.handle.query(ImageBuildWorkflow.status)
    return None


async def wait_for_log(build: Build, text: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            status = await status_of(build)
            if status is not None and status.finished:
                return  # it ended first: the check at the end says whether that was right
            if status is not None and status.log_uri:
                with suppress(Exception):  # the log may not exist yet
                    if text in (await read_log(status.log_uri)).decode(errors="replace"):
                        return
            await asyncio.sleep(0.5)


async def drive(builds: LocalBuilds, planned: Planned, timeout: float) -> None:
    """Cancel or cut short the builds meant to end that way, once their script runs."""
    if planned.kind not in ("cancel", "timeout"):
        return
    await wait_for_log(planned.build, "long: started", timeout)
    while True:
        with suppress(RPCError):
            if planned.kind == "cancel":
                await planned.build.handle.cancel()
            else:
                await builds.set_deadline(planned.build, 0)
            return
        await asyncio.sleep(0.5)


async def finished(builds: LocalBuilds, planned: Planned, folder: Path) -> None:
    """Wait for the build to end (asking again while no worker answers), then check it at once: what it left is
    looked for before later builds reuse its addresses or its namespaces' numbers."""
    while True:
        with suppress(Exception):
            await planned.build.handle.result()
        status = await status_of(planned.build)
        if status is not None and status.finished:
            planned.status = status
            if planned.build.watcher is not None:
                planned.build.watcher.cancel()
            break
        await asyncio.sleep(0.5)
    try:
        await check(builds, planned, folder)
    except Exception as err:  # one build's check that cannot run is that build's problem, not the soak's end
        planned.problems.append(f"could not be checked: {type(err).__name__}: {err}")


async def start_worker(
    builds: LocalBuilds, queue: str, chaos: Chaos, stack: AsyncExitStack
) -> asyncio.subprocess.Process:
    """A worker process on the soak's queue, stopped when ``stack`` closes unless it is gone by then."""
    process = await stack.enter_async_context(
        worker_process(builds.client, builds.state, builds.storage.endpoint, queue)
    )
    chaos.workers.append(process)
    return process


def drop_ssh(builds: LocalBuilds, planned: list[Planned]) -> str | None:
    """Cut the SSH connections of one VM of a build still running: kill its sshd session processes (not the
    listener), as a dropped connection ends them. The VM's name, or None when no VM had a session."""
    processes = host_processes()
    for p in planned:
        if p.status is not None:
            continue  # ended
        for vm in list(p.build.vms.values()):
            try:
                members = set(pid_namespace_members(builds.cloud.vms.leader(vm.name)))
            except (PermanentError, FileNotFoundError):
                continue  # not running (any more)
            sessions = [
                pid
                for pid, _, command in processes
                if pid in members and command.startswith("sshd: ") and "[listener]" not in command
            ]
            for pid in sessions:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if sessions:
                return vm.name
    return None


async def disrupt(
    builds: LocalBuilds,
    queue: str,
    chaos: Chaos,
    faults: Faults,
    storage: Storage | None,
    planned: list[Planned],
    done: asyncio.Event,
    rng: random.Random,
    stack: AsyncExitStack,
    every: tuple[float, float],
) -> None:
    """At random moments: SIGKILL the main worker (and start another at once), and restart Azurite or cut a VM's
    SSH connections, each as often as ``faults`` says; now and then a second worker joins and is stopped
    gracefully."""
    main = await start_worker(builds, queue, chaos, stack)
    extra: asyncio.subprocess.Process | None = None
    while not done.is_set():
        with suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=rng.uniform(*every))
        if done.is_set():
            break
        # Before the kill, which itself ends the dead worker's SSH sessions.
        others = []
        if storage is not None and chaos.storage_restarts < faults.storage_restarts:
            others.append("restart")
        if chaos.ssh_drops < faults.ssh_drops:
            others.append("drop")
        if others and rng.choice(others) == "restart":
            assert storage is not None
            await storage.restart(rng.uniform(*STORAGE_DOWN_SECONDS))
            chaos.storage_restarts += 1
        elif others and drop_ssh(builds, planned) is not None:
            chaos.ssh_drops += 1
        if chaos.kills < faults.kills:
            main.send_signal(signal.SIGKILL)
            await main.wait()
            chaos.kills += 1
            main = await start_worker(builds, queue, chaos, stack)
        if extra is None and rng.random() < 0.5:
            extra = await start_worker(builds, queue, chaos, stack)
        elif extra is not None:
            extra.send_signal(signal.SIGTERM)
            await extra.wait()
            chaos.stops += 1
            extra = None


async def check(builds: LocalBuilds, planned: Planned, folder: Path) -> None:
    status = planned.status
    assert status is not None
    meant = MEANT[planned.kind]
    if status.run_state != meant:
        planned.problems.append(f"{status.run_state} ({status.message[:200]}), meant {meant}")
    if status.run_state == RunState.SUCCEEDED:
        vhd = await download_vhd(status.run_outputs[0].artifact_uri, folder / f"{planned.build.handle.id}.vhd")
        try:
            held = await asyncio.to_thread(debugfs, vhd, f"cat {MARKER}")
            if held.strip() != planned.token:
                planned.problems.append(f"the image holds {held.strip()!r} at {MARKER}, not its token")
        finally:
            vhd.unlink(missing_ok=True)
    planned.problems += await builds.leftovers(planned.build)
    kept = set(builds.kept(planned.build)) - {"log", "output"}
    planned.problems += [f"records of role {role} kept" for role in sorted(kept)]


@dataclass
class SoakResult:
    planned: list[Planned]
    seconds: float
    chaos: Chaos

    @property
    def mismatches(self) -> int:
        """Builds that ended otherwise than meant, lost their customization, or left something."""
        return sum(1 for p in self.planned if p.problems)


def table(results: list[SoakResult]) -> Table:
    """One table of every build of one or more soaks."""
    planned = [p for result in results for p in result.planned]
    did = {
        what: sum(getattr(r.chaos, what) for r in results)
        for what in ("kills", "stops", "storage_restarts", "ssh_drops")
    }
    seconds = sum(r.seconds for r in results)
    shown = Table(
        "build", "meant", "ended", "problems",
        title=f"{len(planned)} local builds in {seconds:.0f} s: {did['kills']} worker kills, {did['stops']} graceful"
        f" stops, {did['storage_restarts']} Azurite restarts, {did['ssh_drops']} SSH drops",
    )  # fmt: skip
    for p in planned:
        shown.add_row(
            p.build.handle.id, MEANT[p.kind], p.status.run_state if p.status else "?",
            "; ".join(p.problems) or "none", style="red" if p.problems else None,
        )  # fmt: skip
    by_kind = {kind: sum(1 for p in planned if p.kind == kind) for kind in MEANT}
    mix = ", ".join(f"{n} meant to {kind}" for kind, n in by_kind.items())
    shown.caption = f"{sum(r.mismatches for r in results)} of {len(planned)} with problems ({mix})"
    return shown


async def soak(
    builds: LocalBuilds,
    *,
    count: int,
    at_once: int,
    faults: Faults,
    seed: int,
    folder: Path,
    timeout: float,
    storage: Storage | None = None,
    every: tuple[float, float] = (8, 30),
) -> SoakResult:
    """Run ``count`` builds, ``at_once`` of them at a time (a new one starts as one ends), through ``faults``: a
    kill and one other fault every ``every`` seconds (a random pick in that range). Each build is checked as it
    ends. Azurite is restarted only when ``storage`` is given: the one the builds use."""
    rng = random.Random(seed)
    queue = f"{builds.task_queue}-chaos-{uuid.uuid4().hex[:6]}"
    chaos = Chaos()
    done = asyncio.Event()
    started = time.monotonic()
    slots = asyncio.Semaphore(at_once)
    all_planned: list[Planned] = []

    async def one(kind: str) -> None:
        async with slots:
            token = f"chaos-{uuid.uuid4().hex[:12]}"
            build = await builds.start(template_for(kind, token, rng), prefix=f"chaos-{kind}", task_queue=queue)
            planned = Planned(kind, build, token)
            all_planned.append(planned)
            await drive(builds, planned, timeout)
            await finished(builds, planned, folder)

    async with AsyncExitStack() as stack:
        disruption = asyncio.create_task(
            disrupt(builds, queue, chaos, faults, storage, all_planned, done, rng, stack, every)
        )
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(one(kind) for kind in plan(count, rng)))
        finally:
            done.set()
            await disruption
    seconds = time.monotonic() - started
    return SoakResult(all_planned, seconds, chaos)
