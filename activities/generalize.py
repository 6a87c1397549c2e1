"""Deprovision (Linux) or sysprep (Windows): AIB's hidden last customizer, or the template's override script.

Deprovision takes away the very login that started it (``waagent -deprovision+user`` deletes the admin user and
the SSH host keys). So a worker that takes the step over after the first one died does not log in again: when
the run has begun, it follows it through the cloud's own way into the VM (``Cloud.agent_session``), which needs
neither.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from temporalio import activity

from activities.clouds.base import PermanentError
from activities.common import CloudActivities
from activities.guest import GuestSession
from activities.scripts import open_guest, run_id_of, run_script
from workflows.models import GuestScriptRequest, GuestScriptResult


class GeneralizeActivities(CloudActivities):
    @activity.defn
    async def generalize(self, request: GuestScriptRequest) -> GuestScriptResult:
        profile = self.guests.profile(request.vm.os_type)
        deprovision = profile.deprovision
        async with AsyncExitStack() as stack:
            guest = await self._run_under_way(request, stack)
            if guest is None:
                guest, log = await open_guest(self.cloud, self.guests, request, stack)
            else:
                log = await self.cloud.open_log(request.build, request.staging, request.log_name)
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

    async def _run_under_way(self, request: GuestScriptRequest, stack: AsyncExitStack) -> GuestSession | None:
        """On a retry, a session through the cloud's own way in if an earlier attempt started the run; None
        when this is the first attempt, the run never began (the login still works), or the cloud has no such
        way into this VM."""
        if activity.info().attempt == 1:
            return None
        try:
            agent = await stack.enter_async_context(self.cloud.agent_session(request.build, request.vm))
            await agent.poll_script(run_id_of(request), 0)
        except PermanentError as err:
            if err.type in ("NoAgentSession", "ScriptLost"):
                return None
            raise
        activity.logger.info("%s: following the run an earlier attempt started, as root", request.label)
        return agent
