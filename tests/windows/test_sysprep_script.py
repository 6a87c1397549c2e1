"""AIB's default deprovisioning script, word for word as the template reference gives it ("Default Sysprep
command" in image-builder-json.md): kiln writes it to c:\\DeprovisioningScript.ps1 before the customizers run and
runs it last, so any difference is a difference from AIB."""

from __future__ import annotations

from activities.guest.windows import AIB_SYSPREP, WindowsProfile
from activities.guest.windows_session import WindowsSession
from tests.wsman import WindowsMachine

# Copied from the template reference, not from kiln.
AIB_DEFAULT_SYSPREP = r"""
Write-Output '>>> Waiting for GA Service (RdAgent) to start ...'
while ((Get-Service RdAgent).Status -ne 'Running') { Start-Sleep -s 5 }
Write-Output '>>> Waiting for GA Service (WindowsAzureTelemetryService) to start ...'
while ((Get-Service WindowsAzureTelemetryService) -and ((Get-Service WindowsAzureTelemetryService).Status -ne 'Running')) { Start-Sleep -s 5 }
Write-Output '>>> Waiting for GA Service (WindowsAzureGuestAgent) to start ...'
while ((Get-Service WindowsAzureGuestAgent).Status -ne 'Running') { Start-Sleep -s 5 }
if( Test-Path $Env:SystemRoot\system32\Sysprep\unattend.xml ) {
  Write-Output '>>> Removing Sysprep\unattend.xml ...'
  Remove-Item $Env:SystemRoot\system32\Sysprep\unattend.xml -Force
}
if (Test-Path $Env:SystemRoot\Panther\unattend.xml) {
  Write-Output '>>> Removing Panther\unattend.xml ...'
  Remove-Item $Env:SystemRoot\Panther\unattend.xml -Force
}
Write-Output '>>> Sysprepping VM ...'
& $Env:SystemRoot\System32\Sysprep\Sysprep.exe /oobe /generalize /quiet /quit
while($true) {
  $imageState = (Get-ItemProperty HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Setup\State).ImageState
  Write-Output $imageState
  if ($imageState -eq 'IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE') { break }
  Start-Sleep -s 5
}
Write-Output '>>> Sysprep complete ...'
"""


async def test_the_default_sysprep_script_is_aibs_word_for_word(
    machine: WindowsMachine, session: WindowsSession
) -> None:
    assert AIB_SYSPREP == AIB_DEFAULT_SYSPREP.removeprefix("\n")
    await WindowsProfile().prepare(session)  # what a build does once the VM answers
    written = machine.files.read("c:\\DeprovisioningScript.ps1").decode()
    assert written == AIB_DEFAULT_SYSPREP.removeprefix("\n")
