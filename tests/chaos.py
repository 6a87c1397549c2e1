"""A chaos soak of real builds on either cloud: many, several at a time, a random mix of outcomes, while workers are
killed and stopped and the builds' surroundings fail.

Each build is meant to end one way: Succeeded (its customizer writes a token the image must hold),
PartiallySucceeded (the same, and one of its two targets cannot be written), Failed in a customizer, Canceled
mid-script, or Failed at its deadline mid-script. While they run, the worker serving them is SIGKILLed at random
moments (a new one is started at once), a second worker joins and is stopped again (SIGTERM), so steps are taken
over both ways, and the cloud's side of the soak (its ``Site``: ``tests/local/chaos.py``, ``tests/azure/chaos.py``)
does its own faults at the same moments. Each build is checked as it ends: its runState is the one meant, its
output holds its customization, and the site finds nothing of it left. ``bench/chaos.py`` runs it at any size,
``tests/local/test_chaos.py`` and ``tests/azure/test_chaos.py`` run short ones.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.table import Table
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from activities.clouds.local.admin import read_log
from activities.clouds.local.azurite import Azurite, start_azurite
from tests.local.builds import host_processes, shell
from tests.local.vms import pid_namespace_members
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildStatus, DeadlineRequest, RunState

# What each kind of build is meant to end as.
MEANT = {
    "succeed": RunState.SUCCEEDED,
    "partial": RunState.PARTIALLY_SUCCEEDED,
    "fail": RunState.FAILED,
    "cancel": RunState.CANCELED,
    "timeout": RunState.FAILED,
}
# Where a build meant to succeed (in whole or in part) writes its token.
MARKER = "/etc/kiln-chaos"
# Seconds a cancelled or timed-out build's script would run if nothing stopped it.
LONG_SCRIPT_SECONDS = 600
# Seconds Azurite stays down when a soak restarts it.
STORAGE_DOWN_SECONDS = (1.0, 5.0)


def customizers(kind: str, token: str, rng: random.Random) -> list[dict[str, Any]]:
    """The customizers of a build of ``kind``: the same on every cloud."""
    if kind in ("succeed", "partial"):
        pause = rng.choice([0, 1, 3, 6])
        return [shell("mark", "echo 'mark: started'", f"sleep {pause}", f"echo {token} | sudo tee {MARKER}")]
    if kind == "fail":
        return [shell("fails", "echo 'fails: started'", f"sleep {rng.choice([0, 2, 5])}", "exit 3")]
    return [shell("long", "echo 'long: started'", f"sleep {LONG_SCRIPT_SECONDS}", "echo 'long: never'")]


@dataclass
class Planned:
    kind: str
    handle: WorkflowHandle[Any, Any]
    build: Any  # what the site knows of the build
    token: str
    status: BuildStatus | None = None
    problems: list[str] = field(default_factory=list)


# One fault of a site's: done to one of the builds still running, or to what they all use; False when it found
# nothing to do it to.
Fault = Callable[[list[Planned], random.Random], Awaitable[bool]]


class Site(Protocol):
    """A cloud's side of a soak: how its builds are made, served, disturbed and checked."""

    cloud: str
    client: Client
    every: tuple[float, float]  # seconds between two faults, at random in this range: a few to a build

    def template(self, kind: str, token: str, rng: random.Random) -> dict[str, Any]:
        """A template of ``kind`` (``customizers`` and the site's targets)."""
        ...

    async def start(self, template: dict[str, Any], prefix: str, task_queue: str) -> tuple[WorkflowHandle, Any]:
        """Start a build: its handle, and what the site keeps of it for ``check``."""
        ...

    def worker(self, task_queue: str) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
        """A worker process serving ``task_queue``, stopped on the way out unless it is gone by then."""
        ...

    def faults(self) -> dict[str, Fault]:
        """The site's own faults, by the name the table counts them under."""
        ...

    async def check(self, planned: Planned, folder: Path) -> list[str]:
        """What is wrong with an ended build besides its runState: a lost customization, anything left."""
        ...


@dataclass
class Faults:
    """What the soak does, in all, while the builds run: worker SIGKILLs, and how many of each of the site's own
    faults (by name; those the site does not have are left out)."""

    kills: int = 0
    others: dict[str, int] = field(default_factory=dict)


@dataclass
class Chaos:
    """What the soak did."""

    kills: int = 0
    stops: int = 0
    done: Counter[str] = field(default_factory=Counter)
    landed: Counter[str] = field(default_factory=Counter)  # the steps running when a worker was killed, by kind


@dataclass
class Storage:
    """A soak's own Azurite, which it restarts: stopped (SIGTERM, as a service is), down a while, then started
    again on the same port with the same data, as a restarted storage service comes back."""

    azurite: Azurite

    async def restart(self, planned: list[Planned], rng: random.Random) -> bool:
        """A ``Fault``: every build's storage is down a while."""
        port = urllib.parse.urlparse(self.azurite.endpoint).port
        await self.azurite.stop()
        await asyncio.sleep(rng.uniform(*STORAGE_DOWN_SECONDS))
        self.azurite = await start_azurite(location=self.azurite.location, port=port)
        return True


def cut_ssh(leaders: list[int]) -> bool:
    """Cut the SSH connections into the first of these VMs (by the host pid of each one's PID 1) that has any:
    kill its sshd session processes (not the listener), as a dropped connection ends them. False when none had a
    session."""
    processes = host_processes()
    for leader in leaders:
        try:
            members = set(pid_namespace_members(leader))
        except FileNotFoundError:
            continue  # not running any more
        sessions = [
            pid
            for pid, _, command in processes
            if pid in members and command.startswith("sshd: ") and "[listener]" not in command
        ]
        for pid in sessions:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if sessions:
            return True
    return False


def plan(count: int, rng: random.Random) -> list[str]:
    """``count`` kinds of build: every kind at least once when there is room, the rest at random, shuffled."""
    kinds = list(MEANT)[:count] + [rng.choice(list(MEANT)) for _ in range(max(0, count - len(MEANT)))]
    rng.shuffle(kinds)
    return kinds


async def status_of(handle: WorkflowHandle[Any, Any]) -> BuildStatus | None:
    """The build's status, or None while no worker answers queries (one was just killed)."""
    with suppress(RPCError):
        return await handle.query(ImageBuildWorkflow.status)
    return None


async def wait_for_log(handle: WorkflowHandle[Any, Any], text: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            status = await status_of(handle)
            if status is not None and status.finished:
                return  # it ended first: the check at the end says whether that was right
            if status is not None and status.log_uri:
                with suppress(Exception):  # the log may not exist yet, or its storage is being restarted
                    if text in (await read_log(status.log_uri)).decode(errors="replace"):
                        return
            await asyncio.sleep(0.5)


async def drive(planned: Planned, timeout: float) -> None:
    """Cancel or cut short the builds meant to end that way, once their script runs."""
    if planned.kind not in ("cancel", "timeout"):
        return
    await wait_for_log(planned.handle, "long: started", timeout)
    while True:
        with suppress(RPCError):
            if planned.kind == "cancel":
                await planned.handle.cancel()
            else:
                await planned.handle.execute_update(ImageBuildWorkflow.set_deadline, DeadlineRequest(seconds=0))
            return
        await asyncio.sleep(0.5)


async def finished(site: Site, planned: Planned, folder: Path) -> None:
    """Wait for the build to end (asking again while no worker answers), then check it at once: what it left is
    looked for before later builds reuse its addresses or its namespaces' numbers."""
    while True:
        with suppress(Exception):
            await planned.handle.result()
        status = await status_of(planned.handle)
        if status is not None and status.finished:
            planned.status = status
            break
        await asyncio.sleep(0.5)
    meant = MEANT[planned.kind]
    if status.run_state != meant:
        planned.problems.append(f"{status.run_state} ({status.message[:200]}), meant {meant}")
    try:
        planned.problems += await site.check(planned, folder)
    except Exception as err:  # one build's check that cannot run is that build's problem, not the soak's end
        planned.problems.append(f"could not be checked: {type(err).__name__}: {err}")


def step_kind(name: str) -> str:
    """A step's name without what only one build has: "customize 2/3: mark" is customize, "cleanup: delete build
    VM" cleanup, "distribute VHD output" distribute."""
    return re.split(r":| \d+/\d+| \w+ output$", name)[0]


async def running_steps(planned: list[Planned]) -> list[str]:
    """The kinds of the steps the builds still running are in (a cleanup is one step of each undo)."""
    statuses = await asyncio.gather(*(status_of(p.handle) for p in planned if p.status is None))
    return [step_kind(s.name) for status in statuses if status for s in status.steps if s.outcome == "running"]


async def disrupt(
    site: Site,
    queue: str,
    chaos: Chaos,
    faults: Faults,
    planned: list[Planned],
    done: asyncio.Event,
    rng: random.Random,
    stack: AsyncExitStack,
    every: tuple[float, float],
) -> None:
    """At random moments: one of the site's faults still owed, then a SIGKILL of the main worker (another starts
    at once), each as often as ``faults`` says; now and then a second worker joins and is stopped gracefully."""
    offered = site.faults()
    main = await stack.enter_async_context(site.worker(queue))
    extra: asyncio.subprocess.Process | None = None
    while not done.is_set():
        with suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=rng.uniform(*every))
        if done.is_set():
            break
        # Before the kill, which itself ends the dead worker's connections.
        owed = [name for name, count in faults.others.items() if name in offered and chaos.done[name] < count]
        if owed:
            name = rng.choice(owed)
            if await offered[name](planned, rng):
                chaos.done[name] += 1
        if chaos.kills < faults.kills:
            chaos.landed.update(await running_steps(planned))
            main.send_signal(signal.SIGKILL)
            await main.wait()
            chaos.kills += 1
            main = await stack.enter_async_context(site.worker(queue))
        if extra is None and rng.random() < 0.5:
            extra = await stack.enter_async_context(site.worker(queue))
        elif extra is not None:
            extra.send_signal(signal.SIGTERM)
            await extra.wait()
            chaos.stops += 1
            extra = None


@dataclass
class SoakResult:
    cloud: str
    planned: list[Planned]
    seconds: float
    chaos: Chaos

    @property
    def mismatches(self) -> int:
        """Builds that ended otherwise than meant, lost their customization, or left something."""
        return sum(1 for p in self.planned if p.problems)


def table(results: list[SoakResult]) -> Table:
    """One table of every build of one or more soaks."""
    planned = [(r.cloud, p) for r in results for p in r.planned]
    done = sum((r.chaos.done for r in results), Counter())
    did = [
        f"{sum(r.chaos.kills for r in results)} worker kills",
        f"{sum(r.chaos.stops for r in results)} graceful stops",
        *(f"{n} {name}" for name, n in sorted(done.items())),
    ]
    clouds = ", ".join(f"{len(r.planned)} {r.cloud} in {r.seconds:.0f} s" for r in results)
    shown = Table(
        "cloud", "build", "meant", "ended", "problems", title=f"{len(planned)} builds ({clouds}): " + ", ".join(did)
    )
    for cloud, p in planned:
        shown.add_row(
            cloud, p.handle.id, MEANT[p.kind], p.status.run_state if p.status else "?",
            "; ".join(p.problems) or "none", style="red" if p.problems else None,
        )  # fmt: skip
    by_kind = Counter(p.kind for _, p in planned)
    mix = ", ".join(f"{by_kind[kind]} meant to {kind}" for kind in MEANT)
    landed = sum((r.chaos.landed for r in results), Counter())
    during = ", ".join(f"{name} {n}" for name, n in landed.most_common())
    shown.caption = (
        f"{sum(r.mismatches for r in results)} of {len(planned)} with problems ({mix}); the steps running at the"
        f" kills: {during or 'none'}"
    )
    return shown


async def soak(
    site: Site,
    *,
    count: int,
    at_once: int,
    faults: Faults,
    seed: int,
    folder: Path,
    timeout: float,
    every: tuple[float, float] | None = None,
) -> SoakResult:
    """Run ``count`` builds, ``at_once`` of them at a time (a new one starts as one ends), through ``faults``: a
    kill and one other fault every ``every`` seconds (a random pick in that range; the site's own by default).
    Each build is checked as it ends."""
    rng = random.Random(seed)
    queue = f"kiln-chaos-{site.cloud}-{uuid.uuid4().hex[:6]}"
    chaos = Chaos()
    done = asyncio.Event()
    started = time.monotonic()
    slots = asyncio.Semaphore(at_once)
    all_planned: list[Planned] = []

    async def one(kind: str) -> None:
        async with slots:
            token = f"chaos-{uuid.uuid4().hex[:12]}"
            handle, build = await site.start(site.template(kind, token, rng), f"chaos-{kind}", queue)
            planned = Planned(kind, handle, build, token)
            all_planned.append(planned)
            await drive(planned, timeout)
            await finished(site, planned, folder)

    async with AsyncExitStack() as stack:
        disruption = asyncio.create_task(
            disrupt(site, queue, chaos, faults, all_planned, done, rng, stack, every or site.every)
        )
        builds = asyncio.ensure_future(asyncio.gather(*(one(kind) for kind in plan(count, rng))))
        try:
            # A disruption that fails (a worker that never polls) ends the soak: no worker may be left to end builds.
            await asyncio.wait([builds, disruption], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not builds.done():
                builds.cancel()
                if disruption.done():
                    disruption.result()  # raises what ended it
                raise TimeoutError(f"the builds did not end within {timeout:.0f} s")
            builds.result()
        finally:
            done.set()
            await disruption
    return SoakResult(site.cloud, all_planned, time.monotonic() - started, chaos)
