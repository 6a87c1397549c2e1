"""Deprovision (Linux) or sysprep (Windows): AIB's hidden last customizer, or the template's override script."""

from __future__ import annotations

from contextlib import AsyncExitStack

from temporalio import activity

from activities.common import CloudActivities
from activities.customize import open_guest, run_script
from workflows.models import GuestScriptRequest, GuestScriptResult

# AIB runs these instead of its default when a customizer wrote them.
OVERRIDE_SCRIPTS = {
    "Linux": ("/tmp/DeprovisioningScript.sh", "sh /tmp/DeprovisioningScript.sh"),
    "Windows": (r"c:\DeprovisioningScript.ps1", r"& c:\DeprovisioningScript.ps1"),
}


class GeneralizeActivities(CloudActivities):
    @activity.defn
    async def generalize(self, request: GuestScriptRequest) -> GuestScriptResult:
        os_type = request.vm.os_type
        override_path, override_command = OVERRIDE_SCRIPTS[os_type]
        async with AsyncExitStack() as stack:
            guest, log = await open_guest(self.cloud, request, stack)
            if await guest.path_exists(override_path):
                note = f"\n==> using the template's {override_path}\n"
                script = override_command
            else:
                note, script = "", self.cloud.deprovision_script(os_type)
            note += f"==> deprovision command:\n{script}\n"
            return await run_script(request, guest, log, script, valid_exit_codes=[0], as_root=True, note=note)
