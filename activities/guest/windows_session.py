"""A ``GuestSession`` on a Windows VM over WinRM: files pushed in chunks, scripts run detached, big files fetched.

Every file goes in as Packer's winrmcp sends it: base64 lines appended to a temporary file with ``echo ... >>``
(each command line stays under cmd.exe's 8191 characters), then decoded into place by PowerShell. A script is
never passed on the command line, where about 3,000 characters of PowerShell is all that fits: it is uploaded and
run as a file.

A step's script runs detached from the WinRM shell, so a dropped connection or a dead worker does not end it:
in its own process created through WMI (as the build admin, as WinRM itself runs), or as a scheduled task (the
admin elevated, or SYSTEM). Its folder ``C:\\Windows\\Temp\\kiln\\runs\\<run id>`` holds the script, its output,
its process id and, once it has ended, its exit code; whoever connects next reads on from any offset. Claiming the
folder (a rename, atomic) is what makes a second start of the same run a no-op.

Each command of kiln's is a short PowerShell script whose first line names it (``# kiln poll-run``) and whose
parameters follow as plain assignments, so it reads the same to a person, to Windows and to a test endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid

from activities.clouds.base import PermanentError
from activities.guest.base import ScriptProgress
from activities.guest.winrm import CommandResult, WinRmClient, ps_quote

GUEST_DIR = r"C:\Windows\Temp\kiln"
RUNS_DIR = rf"{GUEST_DIR}\runs"
POLL_CHUNK_BYTES = 1 << 20
# The longest upload command kiln sends (winrmcp's), safely under cmd.exe's 8191 characters.
CHUNK_LINE = 8000
# How long a guest may take to fetch a large file from staging storage.
FETCH_SECONDS = 3600.0
_SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")

# Decodes an upload's base64 lines into its files (a "*" line starts the next one), then removes them: winrmcp's
# restore step, for several files at once.
_EXPAND_UPLOAD = r"""
function Expand-KilnUpload([string]$from, [string[]]$to) {
  $index = 0
  $out = [IO.File]::Create($to[0])
  try {
    if (Test-Path -LiteralPath $from) {
      foreach ($line in [IO.File]::ReadLines($from)) {
        $line = $line.Trim()
        if ($line -eq '*') { $out.Close(); $index++; $out = [IO.File]::Create($to[$index]) }
        elseif ($line) { $bytes = [Convert]::FromBase64String($line); $out.Write($bytes, 0, $bytes.Length) }
      }
    }
  } finally { $out.Close() }
  Remove-Item -LiteralPath $from -Force -ErrorAction SilentlyContinue
}
"""

_RESTORE = (
    r"""
$ErrorActionPreference = 'Stop'
$folder = Split-Path -Parent $destination
if ($createFolder -eq 'yes') { [void][IO.Directory]::CreateDirectory($folder) }
if (-not (Test-Path -LiteralPath $folder -PathType Container)) {
  Remove-Item -LiteralPath $source -Force -ErrorAction SilentlyContinue
  Write-Output "kiln: the folder $folder does not exist"
  exit 3
}
if (Test-Path -LiteralPath $destination -PathType Container) {
  Remove-Item -LiteralPath $source -Force -ErrorAction SilentlyContinue
  Write-Output "kiln: $destination is a folder"
  exit 4
}
"""
    + _EXPAND_UPLOAD
    + "Expand-KilnUpload $source @($destination)\n"
)

_TEST_PATH = "if (Test-Path -LiteralPath $path) { 'True' } else { 'False' }\n"

# What a run's process executes: records its process id, runs the script with its output in output.log, then
# records the exit code (written aside and renamed, so a reader never sees half of it), removes its script (which
# the image must not keep) and its task, and exits with the script's code (a task's LastTaskResult). The exit
# file, not the task, is what kiln reads: it outlives the task and the worker that started the run.
_RUN_WRAPPER = r"""
$dir = Split-Path -Parent $MyInvocation.MyCommand.Path
Set-Content -LiteralPath "$dir\pid.tmp" -Value $PID
Move-Item -LiteralPath "$dir\pid.tmp" -Destination "$dir\pid"
cmd.exe /c "chcp 65001 >nul & powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File `"$dir\script.ps1`" > `"$dir\output.log`" 2>&1"
$code = $LASTEXITCODE
Set-Content -LiteralPath "$dir\exit.tmp" -Value $code
Move-Item -LiteralPath "$dir\exit.tmp" -Destination "$dir\exit"
Remove-Item -LiteralPath "$dir\script.ps1" -Force -ErrorAction SilentlyContinue
schtasks.exe /Delete /TN ('kiln-' + (Split-Path -Leaf $dir)) /F 2>&1 | Out-Null
exit $code
"""

_START = (
    r"""
$ErrorActionPreference = 'Stop'
"""
    + _EXPAND_UPLOAD
    + r"""
$incoming = "$source.d"
[void][IO.Directory]::CreateDirectory($incoming)
Expand-KilnUpload $source @("$incoming\run.ps1", "$incoming\script.ps1")
$boot = (Get-CimInstance Win32_OperatingSystem).LastBootUpTime.ToUniversalTime().ToString('o')
Set-Content -LiteralPath "$incoming\boot" -Value $boot
[void][IO.Directory]::CreateDirectory((Split-Path -Parent $runDir))
if (Test-Path -LiteralPath $runDir) { Remove-Item -LiteralPath $incoming -Recurse -Force; exit 0 }
[IO.Directory]::Move($incoming, $runDir)
$arguments = "-NoProfile -NonInteractive -ExecutionPolicy Bypass -File `"$runDir\run.ps1`""
try {
  if ($runAs -eq 'user') {
    $made = Invoke-CimMethod -ClassName Win32_Process -MethodName Create -Arguments @{ CommandLine = "powershell.exe $arguments"; CurrentDirectory = $runDir }
    if ($made.ReturnValue -ne 0) { throw "Win32_Process.Create returned $($made.ReturnValue)" }
  } else {
    $scheduler = New-Object -ComObject Schedule.Service
    $scheduler.Connect()
    $task = $scheduler.NewTask(0)
    $task.Principal.RunLevel = 1
    $task.Settings.ExecutionTimeLimit = 'PT0S'
    $task.Settings.DisallowStartIfOnBatteries = $false
    $task.Settings.StopIfGoingOnBatteries = $false
    $action = $task.Actions.Create(0)
    $action.Path = 'powershell.exe'
    $action.Arguments = $arguments
    $action.WorkingDirectory = $runDir
    $name = 'kiln-' + (Split-Path -Leaf $runDir)
    if ($runAs -eq 'system') { $registered = $scheduler.GetFolder('\').RegisterTaskDefinition($name, $task, 6, 'SYSTEM', $null, 5) }
    else { $registered = $scheduler.GetFolder('\').RegisterTaskDefinition($name, $task, 6, $user, $env:KILN_TASK_PASSWORD, 1) }
    [void]$registered.Run($null)
  }
} catch {
  Remove-Item -LiteralPath $runDir -Recurse -Force -ErrorAction SilentlyContinue
  Write-Output "kiln: could not start the script: $_"
  exit 1
}
$waited = 0
while (-not (Test-Path -LiteralPath "$runDir\pid")) {
  if ($waited -ge 300) { Write-Output 'kiln: the script did not start'; exit 1 }
  Start-Sleep -Milliseconds 100
  $waited++
}
"""
)

# Reads the exit code before the output: once the exit file is there the output is complete, so reading in this
# order never reports an end while output is still unread. A run with no exit code whose machine has booted since
# it started was lost to that restart.
_POLL = r"""
if (-not (Test-Path -LiteralPath $runDir)) { 'missing'; exit 0 }
if (Test-Path -LiteralPath "$runDir\exit") { $code = (Get-Content -LiteralPath "$runDir\exit" -Raw).Trim() } else { $code = '-' }
if ($code -eq '-') {
  $boot = (Get-CimInstance Win32_OperatingSystem).LastBootUpTime.ToUniversalTime().ToString('o')
  if ($boot -ne (Get-Content -LiteralPath "$runDir\boot" -Raw).Trim()) { $code = 'lost' }
}
$buffer = New-Object byte[] 0
if (Test-Path -LiteralPath "$runDir\output.log") {
  $stream = [IO.File]::Open("$runDir\output.log", 'Open', 'Read', 'ReadWrite')
  try {
    [void]$stream.Seek($offset, 'Begin')
    $buffer = New-Object byte[] $chunk
    $read = $stream.Read($buffer, 0, $chunk)
    [Array]::Resize([ref]$buffer, $read)
  } finally { $stream.Close() }
}
$code
[Convert]::ToBase64String($buffer)
"""

_KILL = r"""
if (Test-Path -LiteralPath "$runDir\exit") { exit 0 }
if (-not (Test-Path -LiteralPath "$runDir\pid")) { exit 0 }
taskkill.exe /F /T /PID ((Get-Content -LiteralPath "$runDir\pid" -Raw).Trim()) 2>&1 | Out-Null
schtasks.exe /Delete /TN ('kiln-' + (Split-Path -Leaf $runDir)) /F 2>&1 | Out-Null
if (-not (Test-Path -LiteralPath "$runDir\exit")) { Set-Content -LiteralPath "$runDir\exit" -Value 1 }
"""

# Packer's default restart check (stdout must contain "restarted."), and the boot time that tells a new boot.
_BOOT_CHECK = r"""
Write-Output ("{0} restarted." -f [System.Net.Dns]::GetHostName())
Write-Output ('kiln-boot: ' + (Get-CimInstance Win32_OperatingSystem).LastBootUpTime.ToUniversalTime().ToString('o'))
"""

_FETCH = r"""
$ErrorActionPreference = 'Stop'
$folder = Split-Path -Parent $destination
if (-not (Test-Path -LiteralPath $folder -PathType Container)) { Write-Output "kiln: the folder $folder does not exist"; exit 3 }
$partial = "$destination.kiln-partial"
[Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor [Net.SecurityProtocolType]::Tls12
Invoke-WebRequest -UseBasicParsing -Uri $url -OutFile $partial
$hash = (Get-FileHash -Algorithm SHA256 -LiteralPath $partial).Hash.ToLower()
if ($hash -ne $sha256) { Remove-Item -LiteralPath $partial -Force; Write-Output "kiln: the file arrived with sha256 $hash, not $sha256"; exit 5 }
Move-Item -LiteralPath $partial -Destination $destination -Force
"""


def kiln_command(verb: str, body: str, **params: str | int | list[str]) -> str:
    """One of kiln's guest commands: its name, its parameters as PowerShell assignments, a blank line, its body."""
    lines = [f"# kiln {verb}"]
    for name, value in params.items():
        if isinstance(value, list):
            lines.append(f"${name} = @({', '.join(map(ps_quote, value))})")
        else:
            lines.append(f"${name} = {value if isinstance(value, int) else ps_quote(value)}")
    return "\n".join(lines) + "\n\n" + body.lstrip("\n")


def run_dir(run_id: str) -> str:
    """The guest folder of one run; a run id that is not a plain file name is hashed into one."""
    if not _SAFE_RUN_ID.fullmatch(run_id):
        run_id = hashlib.sha256(run_id.encode()).hexdigest()[:32]
    return rf"{RUNS_DIR}\{run_id}"


def chunk_size(path: str) -> int:
    """Raw bytes per ``echo <base64> >> "path"`` line: winrmcp's rule, which keeps the command under 8,000."""
    return (CHUNK_LINE - len(path)) // 4 * 3


class WindowsSession:
    """``GuestSession`` over one ``WinRmClient``, logged in as the build admin ``username``; ``password`` registers
    the scheduled task of an elevated run."""

    def __init__(self, client: WinRmClient, *, username: str, password: str) -> None:
        self.client = client
        self._username = username
        self._password = password

    async def run(self, command: str) -> CommandResult:
        """A command line as WinRM runs it (through cmd.exe): a template's restart command, for one."""
        return await self.client.run(command)

    async def upload(self, data: bytes, destination: str, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``destination``, whose folder must exist (the File customizer's rule on Windows).

        Raises:
            PermanentError: ``DestinationMissing`` when the folder does not exist, or the destination is one.
        """
        await self._restore(await self._push(data), destination, create_folder=False)

    async def path_exists(self, path: str) -> bool:
        result = await self._command("test-path", _TEST_PATH, path=path)
        return result.stdout.strip() == b"True"

    async def start_script(
        self,
        run_id: str,
        script: str,
        *,
        as_root: bool = False,
        as_system: bool = False,
        environment: dict[str, str] | None = None,
    ) -> None:
        run_as = "system" if as_system else "elevated" if as_root else "user"
        # Set first in the script itself, as Packer's powershell provisioner sets its variables: a scheduled task or
        # a WMI process inherits no environment from the command that starts it.
        variables = "".join(f"$env:{name}='{value}'\r\n" for name, value in (environment or {}).items())
        # With a byte order mark, Windows PowerShell reads the file as UTF-8 (without, as the ANSI code page).
        source = await self._push(_RUN_WRAPPER.lstrip().encode(), b"\xef\xbb\xbf" + (variables + script).encode())
        env = {"KILN_TASK_PASSWORD": self._password} if run_as == "elevated" else None
        result = await self._command(
            "start-run", _START, env=env, source=source, runDir=run_dir(run_id), runAs=run_as, user=self._username
        )
        if result.exit_code != 0:
            raise RuntimeError(f"could not start {run_id} in the guest: {result.text.strip()}")

    async def poll_script(self, run_id: str, offset: int) -> ScriptProgress:
        result = await self._command("poll-run", _POLL, runDir=run_dir(run_id), offset=offset, chunk=POLL_CHUNK_BYTES)
        lines = result.stdout.decode(errors="replace").split()
        if result.exit_code != 0 or not lines:
            raise RuntimeError(f"could not read {run_id} in the guest: {result.text.strip()}")
        status = lines[0]
        if status == "missing":
            raise PermanentError(f"the guest has no script run {run_id}: it was never started there", kind="ScriptLost")
        if status == "lost":
            raise PermanentError(
                "the machine restarted while the script ran, so it never finished; restart a Windows build VM "
                "with a WindowsRestart step, not from inside a script",
                kind="ScriptLost",
            )
        output = base64.b64decode(lines[1]) if len(lines) > 1 else b""
        # A full chunk may not be the end of the output: report the exit code only once all of it is read.
        ended = status != "-" and len(output) < POLL_CHUNK_BYTES
        return ScriptProgress(output=output, exit_code=int(status) if ended else None)

    async def kill_script(self, run_id: str) -> None:
        result = await self._command("kill-run", _KILL, runDir=run_dir(run_id))
        if result.exit_code != 0:
            raise RuntimeError(f"could not stop {run_id} in the guest: {result.text.strip()}")

    async def fetch(self, url: str, destination: str, *, sha256: str) -> None:
        """Have the guest download ``url`` to ``destination`` itself and check its sha256: for files too large
        to push through WinRM. ``url`` may carry a SAS, so it goes into no message.

        Raises:
            PermanentError: ``DestinationMissing`` when the destination's folder does not exist; ``FetchFailed``
                when the download failed or arrived changed.
        """
        result = await self._command(
            "fetch-file", _FETCH, timeout=FETCH_SECONDS, url=url, destination=destination, sha256=sha256.lower()
        )
        if result.exit_code == 3:
            raise PermanentError(_kiln_line(result), kind="DestinationMissing")
        if result.exit_code != 0:
            raise PermanentError(
                f"the VM could not fetch the file for {destination} from staging storage: "
                f"{_kiln_line(result) or result.text.strip()[-500:]}",
                kind="FetchFailed",
            )

    async def boot(self) -> tuple[bool, str]:
        """Whether the guest answers Packer's restart check, and when it booted (what tells a restart happened).

        Raises:
            WinRmError: the guest does not answer.
        """
        result = await self._command("boot-check", _BOOT_CHECK)
        found = re.search(r"kiln-boot: (\S+)", result.stdout.decode(errors="replace"))
        return b"restarted." in result.stdout, found.group(1) if found else ""

    async def _push(self, *files: bytes) -> str:
        """Send ``files`` as base64 lines (a ``*`` line between two files) into a new temporary file in the guest,
        with as few ``echo`` commands as fit cmd.exe's line, and return its path."""
        # C:\Windows\Temp always exists, so the first line needs no folder made for it.
        path = rf"C:\Windows\Temp\kiln-upload-{uuid.uuid4().hex}.b64"
        size = chunk_size(path)
        lines: list[str] = []
        for number, data in enumerate(files):
            if number:
                lines.append("*")
            lines += [base64.b64encode(data[start : start + size]).decode() for start in range(0, len(data), size)]
        commands: list[str] = []
        for line in lines:
            echo = f'echo {line} >> "{path}"'
            if commands and len(commands[-1]) + len(echo) + 3 <= CHUNK_LINE:
                commands[-1] += f" & {echo}"
            else:
                commands.append(echo)
        for command in commands:
            result = await self.client.run(command)
            if result.exit_code != 0:
                raise RuntimeError(f"uploading to the guest failed: {result.text.strip()}")
        return path

    async def _restore(self, source: str, destination: str, *, create_folder: bool) -> None:
        result = await self._command(
            "restore-upload",
            _RESTORE,
            source=source,
            destination=destination,
            createFolder="yes" if create_folder else "no",
        )
        if result.exit_code in (3, 4):
            raise PermanentError(_kiln_line(result), kind="DestinationMissing")
        if result.exit_code != 0:
            raise RuntimeError(f"writing {destination} in the guest failed: {result.text.strip()}")

    async def _command(
        self,
        verb: str,
        body: str,
        *,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        **params: str | int,
    ) -> CommandResult:
        return await self.client.run_powershell(kiln_command(verb, body, **params), env=env, timeout=timeout)


def _kiln_line(result: CommandResult) -> str:
    """The reason a kiln command gave for failing (its ``kiln: ...`` line)."""
    found = re.search(r"kiln: (.+)", result.text)
    return found.group(1).strip() if found else ""
