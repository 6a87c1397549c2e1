"""One script in a guest as a build step: start it (or re-attach to it), stream its output into the build log,
and judge its exit code. Customizers, validators and the generalize step all run this way.

A script is never run twice. It runs detached in the guest under a run id derived from the build and the step,
and starting a run id that already started does nothing; so when a worker dies mid-script, the retry attaches to
the same run and reads on from where the log stops. A connection that never got as far as starting the script is
simply retried.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

from temporalio import activity

from activities import build_log
from activities.clouds.base import Cloud, LogSink, PermanentError
from activities.common import heartbeating
from activities.guest import Guests, GuestSession
from workflows.models import GuestScriptRequest, GuestScriptResult, StagedArtifact

POLL_EVERY = 0.5
TAIL_LINES = 10
# What Packer's shell provisioner sets for every script, and so AIB's: scripts that test for them find them.
PACKER_ENVIRONMENT = {"PACKER_BUILD_NAME": build_log.BUILDER, "PACKER_BUILDER_TYPE": build_log.BUILDER}


async def open_guest(
    cloud: Cloud, guests: Guests, request: GuestScriptRequest, stack: AsyncExitStack
) -> tuple[GuestSession, LogSink]:
    """Connect to the VM and open the step's log, heartbeating meanwhile (a VM still booting can take a while)."""
    async with heartbeating():
        session = guests.connect(request.vm, build_id=request.build.build_id, secret=cloud.secret)
        guest = await stack.enter_async_context(session)
        log = await cloud.open_log(request.build, request.staging, request.log_name)
    return guest, log


async def run_script(
    request: GuestScriptRequest,
    guest: GuestSession,
    log: LogSink,
    script: str,
    *,
    provisioner: str,
    valid_exit_codes: list[int],
    as_root: bool = False,
    note: str = "",
) -> GuestScriptResult:
    """Start (or re-attach to) one script in the guest, stream its output into the log, and judge its exit code.

    The log gets Packer's layout (``activities.build_log``) under ``provisioner``'s name (``shell``,
    ``powershell``). ``note`` goes into the log once, before the step's header, so a re-attached retry neither
    repeats it nor mistakes it for script output.

    Raises:
        PermanentError: the script ended with an exit code not in ``valid_exit_codes`` (kind CustomizerFailed).
    """
    started = time.monotonic()
    run_id = f"{request.build.build_id}-{request.log_name.removesuffix('.log')}-{request.index}"
    # A retry reads on from what the log already holds of this run: heartbeat details would lag behind it.
    logged = None
    if activity.info().attempt > 1:
        logged = build_log.logged_output(await log.read(), request.label, provisioner)
    if logged is None:
        await log.append((build_log.note(note) if note else b"") + build_log.step_header(request.label, provisioner))
        logged = (0, True)
    offset, at_line_start = logged
    framer = build_log.OutputFramer(at_line_start=at_line_start)
    await guest.start_script(run_id, script, as_root=as_root, environment=PACKER_ENVIRONMENT)
    tail = b""
    try:
        while True:
            progress = await guest.poll_script(run_id, offset)
            if progress.output:
                await log.append(framer.frame(progress.output))
                offset += len(progress.output)
                tail = (tail + progress.output)[-8192:]
            activity.heartbeat()
            if progress.exit_code is not None:
                break
            await asyncio.sleep(POLL_EVERY)
    except asyncio.CancelledError:
        # The build was cancelled or timed out: stop the script in the guest before the VM is deleted.
        await asyncio.shield(stop_script(guest, log, run_id, request.label, ended_line=framer))
        raise
    exit_code = progress.exit_code
    await log.append(line_end(framer) + build_log.step_end(request.label, provisioner, exit_code, valid_exit_codes))
    if exit_code not in valid_exit_codes:
        last = "\n".join(tail.decode(errors="replace").splitlines()[-TAIL_LINES:])
        raise PermanentError(
            f"{request.label} failed with exit code {exit_code}. Last lines of its output:\n{last}\n"
            f"Full log: {log.uri}",
            kind="CustomizerFailed",
        )
    return GuestScriptResult(exit_code=exit_code, duration_seconds=time.monotonic() - started)


def line_end(framer: build_log.OutputFramer) -> bytes:
    """A newline when the script's output stopped mid-line, so kiln's next line starts a line of its own."""
    return b"" if framer.at_line_start else b"\n"


async def stop_script(
    guest: GuestSession, log: LogSink, run_id: str, label: str, *, ended_line: build_log.OutputFramer
) -> None:
    await guest.kill_script(run_id)
    await log.append(line_end(ended_line) + build_log.step_stopped(label))


def only(staged: list[StagedArtifact], label: str) -> StagedArtifact:
    if len(staged) != 1:
        raise PermanentError(f"{label}: expected one staged artifact, found {len(staged)}", kind="StagingMissing")
    return staged[0]
