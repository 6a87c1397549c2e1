"""One script in a guest as a build step: start it (or re-attach to it), stream its output into the build log,
and judge its exit code. Customizers, validators and the generalize step all run this way, and so does each
round of a Windows Update step.

A script is never run twice. It runs detached in the guest under a run id derived from the build and the step,
and starting a run id that already started does nothing; so when a worker dies mid-script, the retry attaches to
the same run and reads on from where the log stops. A connection that never got as far as starting the script is
simply retried.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from temporalio import activity

from activities import build_log
from activities.clouds.base import Cloud, LogSink, PermanentError
from activities.common import Heartbeat, heartbeating
from activities.guest.base import POLL_EVERY
from activities.handover import worker_stopping
from workflows.models import GuestScriptRequest, GuestScriptResult, StagedArtifact

if TYPE_CHECKING:
    from collections.abc import Callable

    from activities.guest import Guests, GuestSession

TAIL_LINES = 10
# What Packer's shell provisioner sets for every script, and so AIB's: scripts that test for them find them.
PACKER_ENVIRONMENT = {"PACKER_BUILD_NAME": build_log.BUILDER, "PACKER_BUILDER_TYPE": build_log.BUILDER}


@dataclass(frozen=True)
class ScriptEnd:
    """How a script in the guest ended: its exit code and the end of its output."""

    label: str
    exit_code: int
    tail: bytes
    seconds: float

    def last_lines(self) -> str:
        return "\n".join(self.tail.decode(errors="replace").splitlines()[-TAIL_LINES:])


async def open_guest(
    cloud: Cloud, guests: Guests, request: GuestScriptRequest, stack: AsyncExitStack
) -> tuple[GuestSession, LogSink]:
    """Connect to the VM and open the step's log, heartbeating meanwhile (a VM still booting can take a while)."""
    async with heartbeating():
        session = guests.connect(request.vm, build_id=request.build.build_id, secret=cloud.secret)
        guest = await stack.enter_async_context(session)
        log = await cloud.open_log(request.build, request.staging, request.log_name)
    return guest, log


def run_id_of(request: GuestScriptRequest, part: str = "") -> str:
    """The run id of one script of a step in the guest: the same on every attempt, on every worker."""
    run_id = f"{request.build.build_id}-{request.log_name.removesuffix('.log')}-{request.index}"
    if part:
        run_id += "-" + "".join(c if c.isalnum() else "-" for c in part)
    return run_id


def part_label(request: GuestScriptRequest, part: str) -> str:
    """The label of one script of a step: the step's own, or for a step of several scripts, the part's."""
    return f"{request.label}: {part}" if part else request.label


async def follow_script(
    request: GuestScriptRequest,
    guest: GuestSession,
    log: LogSink,
    script: str,
    *,
    provisioner: str,
    as_root: bool = False,
    as_system: bool = False,
    note: str = "",
    part: str = "",
    valid_exit_codes: list[int] | None = None,
    heartbeat: Heartbeat | None = None,
    time_limit: float | None = None,
    stuck: Callable[[str], str] | None = None,
    poll_every: float = POLL_EVERY,
) -> ScriptEnd:
    """Start (or re-attach to) one script in the guest and stream its output into the log until it ends.

    The log gets Packer's layout (``activities.build_log``) under ``provisioner``'s name (``shell``,
    ``powershell``), and the script Packer's environment.

    Args:
        note: written into the log once, before the script's header, so a re-attached retry neither repeats it
            nor mistakes it for script output.
        part: which script of a step of several (an update round): its own run id and header.
        heartbeat: the step's heartbeat with its resume point; without one, heartbeats carry none.
        time_limit: seconds the script may run; past them it is stopped and the step fails.
        stuck: what to say of a script stopped at its time limit, from the end of its output.
        valid_exit_codes: the codes the step takes for success (0 alone by default), which the log's end names.
        poll_every: seconds between two reads of its output.

    Raises:
        PermanentError: ``StepTimedOut`` past ``time_limit``; what the guest raises when the run is lost.
    """
    started = time.monotonic()
    label = part_label(request, part)
    run_id = run_id_of(request, part)
    # A retry reads on from what the log already holds of this run: heartbeat details would lag behind it.
    logged = None
    if activity.info().attempt > 1:
        logged = build_log.logged_output(await log.read(), label, provisioner)
    if logged is None:
        await log.append((build_log.note(note) if note else b"") + build_log.step_header(label, provisioner))
        logged = (0, True)
    offset, at_line_start = logged
    framer = build_log.OutputFramer(at_line_start=at_line_start)
    async with AsyncExitStack() as beating:
        if heartbeat is None:
            # A guest slow to answer one poll must not look like a dead worker: heartbeat meanwhile as well.
            heartbeat = await beating.enter_async_context(heartbeating())
        await guest.start_script(run_id, script, as_root=as_root, as_system=as_system, environment=PACKER_ENVIRONMENT)
        tail = b""
        try:
            while True:
                progress = await guest.poll_script(run_id, offset)
                if progress.output:
                    await log.append(framer.frame(progress.output))
                    offset += len(progress.output)
                    tail = (tail + progress.output)[-8192:]
                heartbeat.beat()
                if progress.exit_code is not None:
                    break
                if time_limit is not None and time.monotonic() - started > time_limit:
                    await stop_script(guest, log, run_id, label, framer, why=f"it ran longer than {time_limit:g} s")
                    said = stuck(tail.decode(errors="replace")) if stuck is not None else ""
                    end = ScriptEnd(label, -1, tail, time.monotonic() - started)
                    raise PermanentError(
                        f"{label} did not finish within {time_limit:g} s{said}. Last lines of its output:\n"
                        f"{end.last_lines()}\nFull log: {log.uri}",
                        kind="StepTimedOut",
                    )
                await asyncio.sleep(poll_every)
        except asyncio.CancelledError:
            # The build was cancelled or timed out: stop the script in the guest before the VM is deleted. A worker
            # that stops leaves it running, for the worker that takes the step over.
            if not worker_stopping():
                await asyncio.shield(stop_script(guest, log, run_id, label, framer, why="the build was cancelled"))
            raise
    ended = build_log.step_end(label, provisioner, progress.exit_code, valid_exit_codes or [0])
    await log.append(line_end(framer) + ended)
    return ScriptEnd(label, progress.exit_code, tail, time.monotonic() - started)


def failed(end: ScriptEnd, log: LogSink) -> PermanentError:
    """The step's failure: its exit code, the last lines of its output, and where the whole log is."""
    return PermanentError(
        f"{end.label} failed with exit code {end.exit_code}. Last lines of its output:\n{end.last_lines()}\n"
        f"Full log: {log.uri}",
        kind="CustomizerFailed",
    )


async def run_script(
    request: GuestScriptRequest,
    guest: GuestSession,
    log: LogSink,
    script: str,
    *,
    provisioner: str,
    valid_exit_codes: list[int],
    as_root: bool = False,
    as_system: bool = False,
    note: str = "",
    time_limit: float | None = None,
    stuck: Callable[[str], str] | None = None,
    poll_every: float = POLL_EVERY,
) -> GuestScriptResult:
    """``follow_script``, then judge the exit code: one outside ``valid_exit_codes`` fails the step."""
    end = await follow_script(
        request,
        guest,
        log,
        script,
        provisioner=provisioner,
        valid_exit_codes=valid_exit_codes,
        as_root=as_root,
        as_system=as_system,
        note=note,
        time_limit=time_limit,
        stuck=stuck,
        poll_every=poll_every,
    )
    if end.exit_code not in valid_exit_codes:
        raise failed(end, log)
    return GuestScriptResult(exit_code=end.exit_code, duration_seconds=end.seconds)


async def logged_section(log: LogSink, label: str, provisioner: str) -> bytes | None:
    """This script's own output as the log holds it (without the builder's prefix), or None if no attempt began
    it."""
    return build_log.section_output(await log.read(), label, provisioner)


def line_end(framer: build_log.OutputFramer) -> bytes:
    """A newline when the script's output stopped mid-line, so kiln's next line starts a line of its own."""
    return b"" if framer.at_line_start else b"\n"


async def stop_script(
    guest: GuestSession, log: LogSink, run_id: str, label: str, framer: build_log.OutputFramer, *, why: str
) -> None:
    """Stop a run in the guest, saying why in the log; a guest that cannot be reached any more is let be (its VM
    is about to be deleted)."""
    try:
        await guest.kill_script(run_id)
    except Exception as err:  # whatever the transport raised: the cancel must go on
        await log.append(line_end(framer) + build_log.note(f"{label}: could not be stopped ({err}); {why}"))
        return
    await log.append(line_end(framer) + build_log.note(f"{label}: stopped, {why}"))


def only(staged: list[StagedArtifact], label: str) -> StagedArtifact:
    if len(staged) != 1:
        raise PermanentError(f"{label}: expected one staged artifact, found {len(staged)}", kind="StagingMissing")
    return staged[0]
