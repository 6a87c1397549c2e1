"""Restarting a Windows build VM, as Packer's windows-restart provisioner does, and seeing that it really did.

Packer's algorithm, kept: run the restart command (0, 1115 "shutdown in progress" and 1190 "shutdown already
scheduled" count as started); ask ``shutdown /r /t 60`` whether a shutdown is under way (no answer, or exit 1,
means the machine is going down; 1115, 1190 and 1717 mean one is under way, so wait; 0 means none was, so that
test shutdown is aborted again); then, every few seconds until ``restartTimeout``, run the template's
``restartCheckCommand`` until the machine answers it (its exit code and output do not matter, as in Packer) and
Packer's own check, whose output must say "restarted.". kiln adds one rule: the machine must also report a boot
time other than the one it had before, so a restart command that did not restart it fails the step instead of
passing.

Each restart is numbered and written into the step's log as it happens (``==> azure-arm: label: restart 2: ...``), and the
boot time from before it goes into the step's heartbeat, so a worker that takes the step over waits for that
same restart instead of starting another.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from temporalio import activity

from activities import build_log
from activities.clouds.base import PermanentError
from activities.common import heartbeating
from activities.events import event_line
from activities.guest.winrm import WinRmError
from workflows.models import GuestScriptRequest, GuestScriptResult
from workflows.template import WindowsRestartCustomizer
from workflows.template.formats import duration_seconds

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from activities.clouds.base import LogSink
    from activities.common import Heartbeat
    from activities.guest.windows_session import WindowsSession

DEFAULT_RESTART_COMMAND = 'shutdown /r /f /t 0 /c "packer restart"'
RESTART_TEST = 'shutdown /r /f /t 60 /c "packer restart test"'
ABORT_TEST = "shutdown /a"
STARTED = (0, 1115, 1190)
UNDER_WAY = (1115, 1190, 1717)


@dataclass(frozen=True)
class RestartTiming:
    """Packer's pauses, in seconds: before each check of a restarting machine, while shutdown.exe says one is
    under way, and before trying again a command the machine did not answer."""

    check_every: float = 5.0
    under_way_every: float = 10.0
    retry_every: float = 2.0


async def run_restart(
    request: GuestScriptRequest, guest: WindowsSession, log: LogSink, *, timing: RestartTiming
) -> GuestScriptResult:
    """A WindowsRestart step: one restart, resumed from the step's heartbeat by a worker that takes it over."""
    step = request.step
    assert isinstance(step, WindowsRestartCustomizer)
    resumed = activity.info().heartbeat_details
    progress = dict(resumed[0]) if resumed else {}
    try:
        timeout = duration_seconds(step.restart_timeout)
    except ValueError as err:  # a documentation template's <placeholder>, which the template check lets through
        raise PermanentError(f"{request.label}: {err}", kind="InvalidTemplate") from None
    if not resumed:
        await log.append(build_log.step_header(request.label, build_log.PROVISIONERS[step.type]))
    async with heartbeating(progress) as heartbeat:
        seconds = await restart(
            guest,
            log,
            request.label,
            number=1,
            command=step.restart_command or DEFAULT_RESTART_COMMAND,
            check_command=step.restart_check_command,
            timeout=timeout,
            timing=timing,
            progress=progress,
            heartbeat=heartbeat,
        )
    return GuestScriptResult(exit_code=0, duration_seconds=seconds)


async def restart(
    guest: WindowsSession,
    log: LogSink,
    label: str,
    *,
    number: int,
    command: str,
    check_command: str,
    timeout: float,
    timing: RestartTiming,
    progress: dict[str, Any],
    heartbeat: Heartbeat,
) -> float:
    """Restart the machine and return the seconds it took, once it is back on a new boot.

    ``progress`` is the step's resume point: ``progress["boot"]`` holds the boot time from before this restart
    (a worker that took the step over finds it there; then a machine already on another boot needs no restart).

    Raises:
        PermanentError: ``RestartFailed`` when the restart command exits with another code than Packer accepts;
            ``RestartTimedOut`` when the machine is not back on a new boot within ``timeout``.
    """
    started = time.monotonic()
    deadline = started + timeout

    async def say(text: str) -> None:
        await log.append(event_line(label, "restart", number, text))

    before = progress.get("boot")
    if before is None:
        before = (await _answer(guest.boot, deadline, timing))[1]
        progress["boot"] = before
        heartbeat.beat(progress)
    elif (await _answer(guest.boot, deadline, timing))[1] != before:
        await say("the machine had restarted already")
        return 0.0
    await say(command)
    result = await _answer(lambda: guest.run(command), deadline, timing)
    if result.exit_code not in STARTED:
        raise PermanentError(
            f"{label}: Restart script exited with non-zero exit status: {result.exit_code}: {result.text.strip()}",
            kind="RestartFailed",
        )
    went_down = await _going_down(guest, say, deadline, timing)
    if went_down:
        await say("the machine is going down")
    custom = check_command.strip()
    while time.monotonic() < deadline:
        await asyncio.sleep(timing.check_every)
        heartbeat.beat()
        try:
            if custom:
                await guest.run(custom)  # until it answers at all: Packer ignores its exit code and output
                custom = ""
            answered, boot = await guest.boot()
        except WinRmError:
            went_down = True
            continue
        if answered and boot != before:
            seconds = time.monotonic() - started
            await say(f"the machine is back after {seconds:.1f} s")
            return seconds
    why = "it went down and did not come back" if went_down else f"it never went down: '{command}' did not restart it"
    raise PermanentError(
        f"{label}: Timeout waiting for machine to restart: {why} within {timeout:g} s", kind="RestartTimedOut"
    )


async def _going_down(
    guest: WindowsSession, say: Callable[[str], Awaitable[None]], deadline: float, timing: RestartTiming
) -> bool:
    """Packer's check that a shutdown is under way (borrowed from Vagrant); True once the machine stopped
    answering, which is certain proof."""
    while time.monotonic() < deadline:
        try:
            test = await guest.run(RESTART_TEST)
        except WinRmError:
            return True
        if test.exit_code == 1:
            return False
        if test.exit_code in UNDER_WAY:
            await say("Reboot already in progress, waiting...")
            await asyncio.sleep(timing.under_way_every)
            continue
        if test.exit_code == 0:
            # Our test shutdown was scheduled, so none was under way: take it back.
            try:
                await guest.run(ABORT_TEST)
            except WinRmError:
                return True
            return False
        await asyncio.sleep(timing.retry_every)
    return False


async def _answer(call: Any, deadline: float, timing: RestartTiming) -> Any:
    """``call()`` retried while the machine does not answer, until ``deadline``."""
    while True:
        try:
            return await call()
        except WinRmError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(timing.retry_every)
