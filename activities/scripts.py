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

from activities.clouds.base import Cloud, LogSink, PermanentError
from activities.common import heartbeating
from activities.guest import Guests, GuestSession
from workflows.models import GuestScriptRequest, GuestScriptResult, StagedArtifact

POLL_EVERY = 0.5
TAIL_LINES = 10


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
    valid_exit_codes: list[int],
    as_root: bool = False,
    note: str = "",
) -> GuestScriptResult:
    """Start (or re-attach to) one script in the guest, stream its output into the log, and judge its exit code.
    ``note`` goes into the log once, before the step's header, so a re-attached retry neither repeats it nor
    mistakes it for script output."""
    started = time.monotonic()
    run_id = f"{request.build.build_id}-{request.log_name.removesuffix('.log')}-{request.index}"
    header = f"\n==> {request.label}\n".encode()
    # A retry reads on from what the log already holds of this run: heartbeat details would lag behind it.
    offset = await logged_output(log, header, request.label) if activity.info().attempt > 1 else None
    if offset is None:
        await log.append(note.encode() + header)
        offset = 0
    await guest.start_script(run_id, script, as_root=as_root)
    tail = b""
    try:
        while True:
            progress = await guest.poll_script(run_id, offset)
            if progress.output:
                await log.append(progress.output)
                offset += len(progress.output)
                tail = (tail + progress.output)[-8192:]
            activity.heartbeat()
            if progress.exit_code is not None:
                break
            await asyncio.sleep(POLL_EVERY)
    except asyncio.CancelledError:
        # The build was cancelled or timed out: stop the script in the guest before the VM is deleted.
        await asyncio.shield(stop_script(guest, log, run_id, request.label))
        raise
    exit_code = progress.exit_code
    await log.append(f"==> {request.label}: exit code {exit_code}\n".encode())
    if exit_code not in valid_exit_codes:
        last = "\n".join(tail.decode(errors="replace").splitlines()[-TAIL_LINES:])
        raise PermanentError(
            f"{request.label} failed with exit code {exit_code}. Last lines of its output:\n{last}\n"
            f"Full log: {log.uri}",
            kind="CustomizerFailed",
        )
    return GuestScriptResult(exit_code=exit_code, duration_seconds=time.monotonic() - started)


async def logged_output(log: LogSink, header: bytes, label: str) -> int | None:
    """How many bytes of this step's script output the log holds already, or None if no attempt began it.

    The step's section runs from its header to its first ``==> label:`` note (or the end): only the script's
    own output is in between.
    """
    text = await log.read()
    at = text.rfind(header)
    if at < 0:
        return None
    section = text[at + len(header) :]
    end = section.find(f"==> {label}: ".encode())
    return len(section) if end < 0 else end


async def stop_script(guest: GuestSession, log: LogSink, run_id: str, label: str) -> None:
    await guest.kill_script(run_id)
    await log.append(f"==> {label}: stopped, the build was cancelled\n".encode())


def only(staged: list[StagedArtifact], label: str) -> StagedArtifact:
    if len(staged) != 1:
        raise PermanentError(f"{label}: expected one staged artifact, found {len(staged)}", kind="StagingMissing")
    return staged[0]
