"""Windows guests as AIB treats them: the steps they run, where files may go, and AIB's sysprep.

kiln cannot yet hold a WinRM session, so a Windows source is refused when it is resolved, before a Windows VM
is paid for; the transport slots in here when it can.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from activities.clouds.base import PermanentError
from activities.guest.base import Deprovision, GuestSession, Transport
from workflows.models import BuildVm, GuestStep
from workflows.plan import guest_steps
from workflows.template import ImageTemplate, PowerShellCustomizer, TemplateIssue

# AIB's default Windows deprovisioning script (the template reference's current form), word for word.
AIB_SYSPREP = """\
Write-Output '>>> Waiting for GA Service (RdAgent) to start ...'
while ((Get-Service RdAgent).Status -ne 'Running') { Start-Sleep -s 5 }
Write-Output '>>> Waiting for GA Service (WindowsAzureTelemetryService) to start ...'
while ((Get-Service WindowsAzureTelemetryService) -and ((Get-Service WindowsAzureTelemetryService).Status -ne 'Running')) { Start-Sleep -s 5 }
Write-Output '>>> Waiting for GA Service (WindowsAzureGuestAgent) to start ...'
while ((Get-Service WindowsAzureGuestAgent).Status -ne 'Running') { Start-Sleep -s 5 }
if( Test-Path $Env:SystemRoot\\system32\\Sysprep\\unattend.xml ) {
  Write-Output '>>> Removing Sysprep\\unattend.xml ...'
  Remove-Item $Env:SystemRoot\\system32\\Sysprep\\unattend.xml -Force
}
if (Test-Path $Env:SystemRoot\\Panther\\unattend.xml) {
  Write-Output '>>> Removing Panther\\unattend.xml ...'
  Remove-Item $Env:SystemRoot\\Panther\\unattend.xml -Force
}
Write-Output '>>> Sysprepping VM ...'
& $Env:SystemRoot\\System32\\Sysprep\\Sysprep.exe /oobe /generalize /quiet /quit
while($true) {
  $imageState = (Get-ItemProperty HKLM:\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Setup\\State).ImageState
  Write-Output $imageState
  if ($imageState -eq 'IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE') { break }
  Start-Sleep -s 5
}
Write-Output '>>> Sysprep complete ...'
"""

# The customizer types AIB runs on a Windows source.
WINDOWS_STEPS = frozenset({"PowerShell", "File", "WindowsRestart", "WindowsUpdate"})


class NoWinRm:
    """Until kiln holds WinRM sessions: a Windows guest cannot be reached, and says so."""

    def session(self, vm: BuildVm, *, build_id: str, secret: bytes) -> AbstractAsyncContextManager[GuestSession]:
        raise PermanentError(
            f"VM {vm.name} runs Windows, and kiln cannot yet run commands in a Windows guest (WinRM)",
            kind="UnsupportedOsType",
        )


class WindowsProfile:
    os_type = "Windows"
    deprovision = Deprovision(
        override_path=r"c:\DeprovisioningScript.ps1",
        override_command=r"& c:\DeprovisioningScript.ps1",
        provisioner="powershell",
    )

    def __init__(self, transport: Transport | None = None) -> None:
        self.transport = transport or NoWinRm()

    def template_issues(self, template: ImageTemplate) -> list[TemplateIssue]:
        # A File customizer may write to any existing path on Windows.
        return [
            TemplateIssue(path=f"{path}.type", message=f"{step.type} needs a Linux source image")
            for path, step in guest_steps(template)
            if step.type not in WINDOWS_STEPS
        ]

    def script_for(self, step: GuestStep, staged: bytes | None) -> str:
        assert isinstance(step, PowerShellCustomizer)
        if step.inline is not None:
            return "\n".join(step.inline) + "\n"
        assert staged is not None
        return staged.decode()

    async def default_deprovision(self, guest: GuestSession, vm: BuildVm) -> str:
        return AIB_SYSPREP
