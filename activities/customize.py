"""Customizers and validators: one activity per step, running the script in the guest and streaming its output.

A script is never run twice. It runs detached in the guest under a run id derived from the build and the step,
and starting a run id that already started does nothing; so when a worker dies mid-script, the retry attaches to
the same run and reads on from where the log stops. A connection that never got as far as
starting the script is simply retried.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

from temporalio import activity

from activities.clouds.base import Cloud, GuestSession, LogSink, PermanentError
from activities.common import CloudActivities, heartbeating
from workflows.models import GuestScriptRequest, GuestScriptResult, StagedArtifact
from workflows.template import (
    FileCustomizer,
    PowerShellCustomizer,
    ShellCustomizer,
    WindowsRestartCustomizer,
    WindowsUpdateCustomizer,
)

POLL_EVERY = 0.5
TAIL_LINES = 10


class CustomizeActivities(CloudActivities):
    @activity.defn
    async def run_customizer(self, request: GuestScriptRequest) -> GuestScriptResult:
        async with AsyncExitStack() as stack:
            guest, log = await open_guest(self.cloud, request, stack)
            step = request.step
            if isinstance(step, FileCustomizer):
                return await self._copy_file(request, guest, log, step)
            script = await self._script_for(request)
            valid = step.valid_exit_codes if isinstance(step, PowerShellCustomizer) else [0]
            return await run_script(request, guest, log, script, valid_exit_codes=valid)

    async def _copy_file(
        self, request: GuestScriptRequest, guest: GuestSession, log: LogSink, step: FileCustomizer
    ) -> GuestScriptResult:
        started = time.monotonic()
        data = await self.cloud.read_staged(request.build, only(request.staged, request.label))
        await log.append(f"\n==> {request.label}: copying {step.source_uri} to {step.destination}\n".encode())
        await guest.upload(data, step.destination)
        await log.append(f"==> {request.label}: {len(data)} bytes copied\n".encode())
        return GuestScriptResult(exit_code=0, duration_seconds=time.monotonic() - started)

    async def _script_for(self, request: GuestScriptRequest) -> str:
        step = request.step
        if isinstance(step, ShellCustomizer | PowerShellCustomizer):
            if step.inline is not None:
                return "\n".join(step.inline) + "\n"
            data = await self.cloud.read_staged(request.build, only(request.staged, request.label))
            return data.decode()
        if isinstance(step, WindowsRestartCustomizer | WindowsUpdateCustomizer):
            raise PermanentError(
                f"{request.label}: {step.type} needs a Windows guest, and this build VM runs Linux",
                kind="UnsupportedCustomizer",
            )
        raise PermanentError(f"{request.label}: nothing to run", kind="UnsupportedCustomizer")


async def open_guest(cloud: Cloud, request: GuestScriptRequest, stack: AsyncExitStack) -> tuple[GuestSession, LogSink]:
    """Connect to the VM and open the step's log, heartbeating meanwhile (a VM still booting can take a while)."""
    async with heartbeating():
        guest = await stack.enter_async_context(cloud.connect(request.build, request.vm))
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
