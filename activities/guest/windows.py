"""Windows guests as AIB treats them, reached over WinRM: the steps they run, where files may go, AIB's sysprep.

A Windows build VM is reached over WinRM/HTTPS as its admin user, whose password derives from the worker secret
(``keys.windows_password``), and whose listener certificate the cloud pinned in ``BuildVm.host_key`` as
``winrm-sha1:<thumbprint>``. Scripts run as PowerShell files, detached (``windows_session``); ``runElevated``
runs one as the admin in a scheduled task, ``runAsSystem`` as SYSTEM. A File customizer's source is pushed
through WinRM, or, when large, fetched by the VM itself from staging storage. WindowsRestart and WindowsUpdate
are steps of this profile's own (``windows_restart``, ``windows_update``).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, cast

from activities.clouds.base import PermanentError
from activities.guest.base import POLL_EVERY, Deprovision, FileSource, GuestSession, Transport
from activities.guest.keys import windows_password
from activities.guest.windows_restart import RestartTiming, run_restart
from activities.guest.windows_session import WindowsSession
from activities.guest.windows_update import run_updates
from activities.guest.winrm import GuestUnreachable, WinRmClient, WinRmSettings
from workflows.models import BuildVm, GuestScriptRequest, GuestScriptResult, GuestStep
from workflows.plan import guest_steps
from workflows.template import (
    ImageTemplate,
    PowerShellCustomizer,
    TemplateIssue,
    WindowsRestartCustomizer,
    WindowsUpdateCustomizer,
)

if TYPE_CHECKING:
    from activities.clouds.base import LogSink

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
DEPROVISIONING_SCRIPT = r"c:\DeprovisioningScript.ps1"

# Inline lines as Packer (1.14 on) runs them: in try, so the first failing statement fails the script with exit
# code 1; otherwise a native command's last non-zero exit code is the script's. The marker lines stay as they are.
INLINE_WRAPPER = """\
$ProgressPreference = 'SilentlyContinue'
$exitCode = 0
try {{
# --- the template's lines
{lines}
# --- end of the template's lines
}} catch {{
  Write-Error "An error occurred: $_"
  $exitCode = 1
}}
if ((Test-Path variable:global:LASTEXITCODE) -and $LASTEXITCODE -ne $null -and $LASTEXITCODE -ne 0) {{ $exitCode = $LASTEXITCODE }}
exit $exitCode
"""

# The customizer types AIB runs on a Windows source.
WINDOWS_STEPS = frozenset({"PowerShell", "File", "WindowsRestart", "WindowsUpdate"})
# How long sysprep may take before the step fails: AIB's script would wait for its state forever.
SYSPREP_LIMIT = 40 * 60.0
# Larger File sources are fetched by the VM from staging storage: pushing them through WinRM in 6 KB commands
# takes minutes (AIB calls its File customizer fit for small files only).
FETCH_ABOVE = 256 * 1024
MAX_RESTARTS = 10
_PIN = re.compile(r"winrm-sha1:([0-9A-Fa-f]{40})")


def sysprep_state(tail: str) -> str:
    """Where sysprep stuck, from the end of its output: the last image state it printed."""
    states = re.findall(r"IMAGE_STATE_[A-Z_]+", tail)
    return f": sysprep stuck in {states[-1]}, not IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE" if states else ""


class WinRmTransport:
    """Logs in as the VM's admin user over WinRM/HTTPS, accepting only the listener certificate pinned for the VM.

    Args:
        insecure: accept a VM without a pinned certificate, unchecked: only when the user asks
            (``KILN_WINRM_INSECURE=1``), for a cloud that cannot pin one.
        connect_seconds: how long a VM that does not answer yet (its listener just made) is waited for.
    """

    def __init__(
        self, settings: WinRmSettings | None = None, *, insecure: bool = False, connect_seconds: float = 60.0
    ) -> None:
        self.settings = settings or WinRmSettings()
        self.insecure = insecure
        self.connect_seconds = connect_seconds

    @asynccontextmanager
    async def session(self, vm: BuildVm, *, build_id: str, secret: bytes) -> AsyncIterator[WindowsSession]:
        pinned = _PIN.fullmatch(vm.host_key or "")
        if pinned is None and not self.insecure:
            raise PermanentError(
                f"VM {vm.name} has no pinned WinRM certificate ('{vm.host_key}'); set KILN_WINRM_INSECURE=1 to "
                "connect without checking it",
                kind="HostKeyMissing",
            )
        password = windows_password(secret, build_id)
        client = WinRmClient(
            host=vm.host,
            port=vm.port,
            username=vm.admin_user,
            password=password,
            thumbprint=pinned.group(1) if pinned else None,
            settings=self.settings,
        )
        try:
            session = WindowsSession(client, username=vm.admin_user, password=password)
            deadline = time.monotonic() + self.connect_seconds
            while True:  # Packer's readiness check: a command the VM answers
                try:
                    await session.boot()
                    break
                except GuestUnreachable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1.0)
            yield session
        finally:
            client.close()


class WindowsProfile:
    """Windows as AIB treats it.

    Args:
        restart_timing: Packer's pauses while a machine restarts.
        max_restarts: restarts one step may ask for before it fails (a machine in a restart loop).
        sysprep_limit: seconds the deprovision step may wait for sysprep.
        fetch_above: File sources larger than this many bytes are fetched by the VM itself.
        poll_every: seconds between two reads of a running script's output.
    """

    os_type = "Windows"

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        restart_timing: RestartTiming | None = None,
        max_restarts: int = MAX_RESTARTS,
        sysprep_limit: float = SYSPREP_LIMIT,
        fetch_above: int = FETCH_ABOVE,
        poll_every: float = POLL_EVERY,
    ) -> None:
        self.transport = transport or WinRmTransport()
        self.poll_every = poll_every
        self.restart_timing = restart_timing or RestartTiming()
        self.max_restarts = max_restarts
        self.fetch_above = fetch_above
        self.deprovision = Deprovision(
            override_path=DEPROVISIONING_SCRIPT,
            override_command=f"& {DEPROVISIONING_SCRIPT}",
            provisioner="powershell",
            default_written_first=True,
            time_limit=sysprep_limit,
            stuck=sysprep_state,
        )

    @classmethod
    def from_environment(cls) -> WindowsProfile:
        """The profile as the worker's environment configures it: ``KILN_WINRM_INSECURE=1`` and
        ``KILN_WINDOWS_MAX_RESTARTS`` (default 10).

        Raises:
            ValueError: either is set to what it cannot be, naming the variable.
        """
        insecure = os.environ.get("KILN_WINRM_INSECURE", "")
        if insecure not in ("", "0", "1"):
            raise ValueError(
                f"KILN_WINRM_INSECURE must be 1 (accept a WinRM certificate kiln could not pin) or 0, not '{insecure}'"
            )
        restarts = os.environ.get("KILN_WINDOWS_MAX_RESTARTS", "")
        if restarts and not (restarts.isdigit() and int(restarts) >= 1):
            raise ValueError(
                f"KILN_WINDOWS_MAX_RESTARTS must be a whole number of restarts, 1 or more (default {MAX_RESTARTS}), "
                f"not '{restarts}'"
            )
        return cls(WinRmTransport(insecure=insecure == "1"), max_restarts=int(restarts or MAX_RESTARTS))

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
            return INLINE_WRAPPER.format(lines="\n".join(step.inline))
        assert staged is not None
        return staged.decode("utf-8-sig")

    async def prepare(self, guest: GuestSession) -> None:
        # AIB writes its deprovisioning script before the customizers run: templates edit it in place.
        if not await guest.path_exists(DEPROVISIONING_SCRIPT):
            await guest.upload(AIB_SYSPREP.encode(), DEPROVISIONING_SCRIPT)

    async def copy_file(self, guest: GuestSession, destination: str, source: FileSource) -> None:
        if source.size > self.fetch_above:
            await _windows(guest).fetch(await source.url(), destination, sha256=source.sha256)
        else:
            await guest.upload(await source.read(), destination)

    async def run_step(self, request: GuestScriptRequest, guest: GuestSession, log: LogSink) -> GuestScriptResult:
        step = request.step
        if isinstance(step, WindowsUpdateCustomizer):
            return await run_updates(
                request,
                _windows(guest),
                log,
                timing=self.restart_timing,
                max_restarts=self.max_restarts,
                poll_every=self.poll_every,
            )
        if isinstance(step, WindowsRestartCustomizer):
            return await run_restart(request, _windows(guest), log, timing=self.restart_timing)
        raise PermanentError(
            f"{request.label}: kiln cannot run {type(step).__name__} steps", kind="UnsupportedCustomizer"
        )

    async def default_deprovision(self, guest: GuestSession, vm: BuildVm) -> str:
        return AIB_SYSPREP


def _windows(guest: GuestSession) -> WindowsSession:
    """The WinRM session behind a Windows guest: what restarts, updates and fetches need beyond the protocol."""
    return cast(WindowsSession, guest)
