"""Deprovision (Linux) or sysprep (Windows): AIB's hidden last customizer, or the template's override script."""

from __future__ import annotations

from contextlib import AsyncExitStack

from temporalio import activity

from activities.common import CloudActivities
from activities.scripts import open_guest, run_script
from workflows.models import GuestScriptRequest, GuestScriptResult


class GeneralizeActivities(CloudActivities):
    @activity.defn
    async def generalize(self, request: GuestScriptRequest) -> GuestScriptResult:
        profile = self.guests.profile(request.vm.os_type)
        deprovision = profile.deprovision
        async with AsyncExitStack() as stack:
            guest, log = await open_guest(self.cloud, self.guests, request, stack)
            # AIB runs the override instead of its default when it is there: a customizer wrote it, or (Windows)
            # AIB wrote its default there first and the customizers left it, or changed it.
            override = deprovision.override_path
            if await guest.path_exists(override):
                whose = (
                    "AIB's default, as the customizers left it"
                    if deprovision.default_written_first
                    else "the template's"
                )
                note = f"running {override} ({whose})\n"
                script = deprovision.override_command
            else:
                note, script = "", await profile.default_deprovision(guest, request.vm)
            note += f"Found command: {script}"
            return await run_script(
                request,
                guest,
                log,
                script,
                provisioner=deprovision.provisioner,
                valid_exit_codes=[0],
                as_root=True,
                note=note,
                time_limit=deprovision.time_limit,
                stuck=deprovision.stuck,
                poll_every=profile.poll_every,
            )
