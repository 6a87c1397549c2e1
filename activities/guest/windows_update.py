"""WindowsUpdate: rounds of search, filter and install as SYSTEM, a restart after each, until nothing is left.

AIB builds this customizer on the community windows-update plugin for Packer; kiln keeps its rules. The search
criteria default to ``BrowseOnly=0 and IsInstalled=0``; each filter is ``include:`` or ``exclude:`` and a
PowerShell expression on ``$_`` (the update), the first that matches deciding, and an update no filter matches
is left out (with no filters: ``include:$true``); ``updateLimit`` (0 means 1000) updates at most are installed
per round. A round that installed anything, or found a restart pending before it could search, exits 101 and
the machine restarts; the next round searches again. A round whose install Windows Update refused with
0x80240016 (WU_E_INSTALL_NOT_ALLOWED: a restart or another installation is pending) is followed by a restart
too, and tried again, instead of failing the step.

Each round is a detached script (``activities.scripts``) of its own, and the step's heartbeat holds the round, its
phase, the restarts so far and the updates installed so far: a worker that takes the step over re-attaches to the
round running, or waits for the restart under way, instead of starting over. A machine that keeps asking for a
restart fails the step after ``max_restarts`` of them, naming the updates it still offered.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from temporalio import activity

from activities.build_log import PROVISIONERS
from activities.clouds.base import PermanentError
from activities.common import heartbeating
from activities.events import event_line
from activities.guest.windows_restart import RestartTiming, restart
from activities.guest.windows_session import kiln_command
from activities.scripts import failed, follow_script, logged_section, part_label
from workflows.models import GuestScriptResult
from workflows.template import WindowsUpdateCustomizer

if TYPE_CHECKING:
    from activities.clouds.base import LogSink
    from activities.guest.windows_session import WindowsSession
    from workflows.models import GuestScriptRequest

DEFAULT_CRITERIA = "BrowseOnly=0 and IsInstalled=0"
DEFAULT_FILTERS = ["include:$true"]
DEFAULT_LIMIT = 1000
# The plugin's restart command and timeout between rounds.
RESTART_COMMAND = 'shutdown.exe -f -r -t 0 -c "packer restart"'
RESTART_TIMEOUT = 4 * 3600.0
# 101, or its HRESULT form as Windows Server 2012 reports it: a restart is needed.
PROVISIONER = PROVISIONERS["WindowsUpdate"]
RESTART_NEEDED = (101, 2147942501)
NOT_ALLOWED = "0x80240016"
_FOUND = re.compile(r"^Found Windows update \((?P<kb>[^;)]+)[^)]*\): (?P<title>.+?)\s*$", re.MULTILINE)

# One round: search, filter, download and install, as the windows-update plugin's script does.
UPDATE_SCRIPT = r"""
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
trap {
  Write-Output "ERROR: $_"
  Write-Output (($_.ScriptStackTrace -split '\r?\n') -replace '^(.*)$', 'ERROR: $1')
  exit 1
}
function Test-RestartPending {
  if ((New-Object -ComObject Microsoft.Update.SystemInfo).RebootRequired) { return $true }
  $pending = 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Component Based Servicing\PackagesPending'
  return (Test-Path $pending) -and @(Get-ChildItem $pending).Count -gt 0
}
if (Test-RestartPending) { Write-Output 'A restart is pending before updates can be searched.'; exit 101 }
$rules = foreach ($filter in $Filters) {
  $action, $expression = $filter -split ':', 2
  [pscustomobject]@{ Include = $action -eq 'include'; Test = [ScriptBlock]::Create($expression) }
}
$session = New-Object -ComObject Microsoft.Update.Session
$session.ClientApplicationID = 'kiln'
Write-Output "Searching for Windows updates: $SearchCriteria"
$found = $session.CreateUpdateSearcher().Search($SearchCriteria)
$chosen = New-Object -ComObject Microsoft.Update.UpdateColl
foreach ($update in $found.Updates) {
  $kb = if ($update.KBArticleIDs.Count) { 'KB' + $update.KBArticleIDs.Item(0) } else { 'no KB' }
  $include = $false
  foreach ($rule in $rules) {
    if (Where-Object -InputObject $update -FilterScript $rule.Test) { $include = $rule.Include; break }
  }
  if (-not $include) { Write-Output "Skipped (filter) Windows update ($kb): $($update.Title)"; continue }
  if ($chosen.Count -ge $UpdateLimit) { break }
  if (-not $update.EulaAccepted) { $update.AcceptEula() | Out-Null }
  Write-Output "Found Windows update ($kb; $([math]::Round($update.MaxDownloadSize / 1MB)) MB): $($update.Title)"
  [void]$chosen.Add($update)
}
if ($chosen.Count -eq 0) { Write-Output 'No Windows updates found'; exit 0 }
Write-Output "Downloading $($chosen.Count) Windows updates..."
$downloader = $session.CreateUpdateDownloader()
$downloader.Updates = $chosen
$downloader.Priority = 4
[void]$downloader.Download()
Write-Output "Installing $($chosen.Count) Windows updates..."
$installer = $session.CreateUpdateInstaller()
$installer.Updates = $chosen
$result = $installer.Install()
Write-Output "Installed $($chosen.Count) Windows updates (result $($result.ResultCode); restart required: $($result.RebootRequired))"
# As the plugin does since 0.18: always restart after installing, then search again.
exit 101
"""


def update_script(step: WindowsUpdateCustomizer) -> str:
    """The round's script, with the step's criteria, filters and limit as its parameters."""
    return kiln_command(
        "windows-update",
        UPDATE_SCRIPT,
        SearchCriteria=step.search_criteria or DEFAULT_CRITERIA,
        Filters=step.filters or DEFAULT_FILTERS,
        UpdateLimit=step.update_limit or DEFAULT_LIMIT,
    )


async def run_updates(
    request: GuestScriptRequest,
    guest: WindowsSession,
    log: LogSink,
    *,
    timing: RestartTiming,
    max_restarts: int,
    poll_every: float,
) -> GuestScriptResult:
    """Run update rounds until one finds nothing to install.

    Raises:
        PermanentError: ``CustomizerFailed`` for a round that failed otherwise; ``RestartLoop`` past
            ``max_restarts``; what a restart raises.
    """
    step = request.step
    assert isinstance(step, WindowsUpdateCustomizer)
    started = time.monotonic()
    script = update_script(step)
    # A worker that takes the step over carries on from the last resume point its heartbeats recorded.
    resumed = activity.info().heartbeat_details
    progress: dict[str, Any] = (
        dict(resumed[0]) if resumed else {"round": 1, "phase": "round", "restarts": 0, "installed": []}
    )
    async with heartbeating(progress) as heartbeat:
        while True:
            number = progress["round"]
            part = f"update round {number}"
            label = part_label(request, part)
            if progress["phase"] == "round":
                if "boot" not in progress:
                    progress["boot"] = (await guest.boot())[1]
                heartbeat.beat(progress)
                end = await follow_script(
                    request,
                    guest,
                    log,
                    script,
                    provisioner=PROVISIONER,
                    valid_exit_codes=[0, *RESTART_NEEDED],
                    as_system=True,
                    part=part,
                    heartbeat=heartbeat,
                    poll_every=poll_every,
                )
                output = (await logged_section(log, label, PROVISIONER) or b"").decode(errors="replace")
                found = [f"{m['kb']} {m['title']}" for m in _FOUND.finditer(output)]
                if end.exit_code == 0:
                    installed = progress["installed"]
                    done = f"no more updates; {len(installed)} installed in {number} rounds, {progress['restarts']} restarts"
                    await log.append(event_line(request.label, "update round", number, done))
                    return GuestScriptResult(exit_code=0, duration_seconds=time.monotonic() - started)
                if end.exit_code in RESTART_NEEDED:
                    progress["installed"] += [f for f in found if f not in progress["installed"]]
                    what = f"installed {'; '.join(found)}" if found else "a restart is pending"
                elif NOT_ALLOWED in output:
                    what = f"Windows Update refused to install ({NOT_ALLOWED}: a restart is pending); restarting first"
                else:
                    raise failed(end, log)
                await log.append(event_line(request.label, "update round", number, what))
                if progress["restarts"] >= max_restarts:
                    pending = "; ".join(found) or "none named"
                    raise PermanentError(
                        f"{request.label}: the machine asked for a restart {progress['restarts'] + 1} times, more than "
                        f"the {max_restarts} kiln allows one step; updates still pending: {pending}",
                        kind="RestartLoop",
                    )
                progress.update(phase="restarting", restarts=progress["restarts"] + 1, pending=found)
                heartbeat.beat(progress)
            await restart(
                guest,
                log,
                request.label,
                number=progress["restarts"],
                command=RESTART_COMMAND,
                check_command="",
                timeout=RESTART_TIMEOUT,
                timing=timing,
                progress=progress,
                heartbeat=heartbeat,
            )
            progress.update(round=number + 1, phase="round")
            progress.pop("boot", None)
            heartbeat.beat(progress)
