"""Customizers and validators: one activity per step, running it in the guest and streaming its output.

What a step's script is comes from the guest's OS profile; running it (detached, re-attachable, never twice)
is ``activities.scripts``'.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from temporalio import activity

from activities import build_log
from activities.clouds.base import LogSink, PermanentError
from activities.common import CloudActivities
from activities.guest import GuestSession
from activities.scripts import only, open_guest, run_script
from workflows.models import GuestScriptRequest, GuestScriptResult
from workflows.template import FileCustomizer, PowerShellCustomizer, ShellCustomizer


class CustomizeActivities(CloudActivities):
    @activity.defn
    async def run_customizer(self, request: GuestScriptRequest) -> GuestScriptResult:
        async with AsyncExitStack() as stack:
            guest, log = await open_guest(self.cloud, self.guests, request, stack)
            step = request.step
            if isinstance(step, FileCustomizer):
                return await self._copy_file(request, guest, log, step)
            if isinstance(step, ShellCustomizer | PowerShellCustomizer):
                staged = None
                if step.inline is None:
                    staged = await self.cloud.read_staged(request.build, only(request.staged, request.label))
                script = self.guests.profile(request.vm.os_type).script_for(step, staged)
                valid = step.valid_exit_codes if isinstance(step, PowerShellCustomizer) else [0]
                provisioner = build_log.PROVISIONERS[step.type]
                return await run_script(request, guest, log, script, provisioner=provisioner, valid_exit_codes=valid)
            raise PermanentError(
                f"{request.label}: kiln cannot run {step.type} steps yet", kind="UnsupportedCustomizer"
            )

    async def _copy_file(
        self, request: GuestScriptRequest, guest: GuestSession, log: LogSink, step: FileCustomizer
    ) -> GuestScriptResult:
        started = time.monotonic()
        data = await self.cloud.read_staged(request.build, only(request.staged, request.label))
        header = build_log.step_header(request.label, build_log.PROVISIONERS[step.type])
        await log.append(header + build_log.note(f"Uploading {step.source_uri} => {step.destination}"))
        await guest.upload(data, step.destination)
        copied = build_log.note(f"{request.label}: {len(data)} bytes copied")
        await log.append(copied + build_log.provisioner_end(build_log.PROVISIONERS[step.type]))
        return GuestScriptResult(exit_code=0, duration_seconds=time.monotonic() - started)
