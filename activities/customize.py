"""Customizers and validators: one activity per step, running it in the guest and streaming its output.

What a step's script is, how a file gets into the guest, and the steps that are no single script (Windows'
restarts and updates) come from the guest's OS profile; running a script (detached, re-attachable, never twice)
is ``activities.scripts``'.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from temporalio import activity

from activities import build_log
from activities.clouds.base import LogSink
from activities.common import CloudActivities
from activities.guest import FileSource, GuestSession, OsProfile
from activities.scripts import only, open_guest, run_script
from workflows.models import GuestScriptRequest, GuestScriptResult
from workflows.template import FileCustomizer, PowerShellCustomizer, ShellCustomizer


class CustomizeActivities(CloudActivities):
    @activity.defn
    async def run_customizer(self, request: GuestScriptRequest) -> GuestScriptResult:
        profile = self.guests.profile(request.vm.os_type)
        async with AsyncExitStack() as stack:
            guest, log = await open_guest(self.cloud, self.guests, request, stack)
            if request.index == 0 and request.log_name == "customization.log":
                await profile.prepare(guest)
            step = request.step
            if isinstance(step, FileCustomizer):
                return await self._copy_file(request, profile, guest, log, step)
            if isinstance(step, ShellCustomizer | PowerShellCustomizer):
                staged = None
                if step.inline is None:
                    staged = await self.cloud.read_staged(request.build, only(request.staged, request.label))
                script = profile.script_for(step, staged)
                powershell = isinstance(step, PowerShellCustomizer)
                return await run_script(
                    request,
                    guest,
                    log,
                    script,
                    provisioner=build_log.PROVISIONERS[step.type],
                    valid_exit_codes=step.valid_exit_codes if powershell else [0],
                    # AIB: runAsSystem needs runElevated, so SYSTEM is the elevated run's user.
                    as_root=powershell and step.run_elevated,
                    as_system=powershell and step.run_as_system,
                    poll_every=profile.poll_every,
                )
            return await profile.run_step(request, guest, log)

    async def _copy_file(
        self, request: GuestScriptRequest, profile: OsProfile, guest: GuestSession, log: LogSink, step: FileCustomizer
    ) -> GuestScriptResult:
        started = time.monotonic()
        staged = only(request.staged, request.label)
        source = FileSource(
            size=staged.size,
            sha256=staged.sha256,
            read=lambda: self.cloud.read_staged(request.build, staged),
            url=lambda: self.cloud.read_url(request.build, staged),
        )
        provisioner = build_log.PROVISIONERS[step.type]
        header = build_log.step_header(request.label, provisioner)
        await log.append(header + build_log.note(f"Uploading {step.source_uri} => {step.destination}"))
        await profile.copy_file(guest, step.destination, source)
        copied = build_log.note(f"{request.label}: {staged.size} bytes copied")
        await log.append(copied + build_log.provisioner_end(provisioner))
        return GuestScriptResult(exit_code=0, duration_seconds=time.monotonic() - started)
