"""A scripted Windows machine behind a WS-Management endpoint, for kiln's Windows steps to meet.

What runs on it: the command lines WinRM hands cmd.exe (``echo ... >> file``, ``shutdown``, PowerShell with
``-EncodedCommand`` or ``-Command``, cmd.exe's 8191-character limit included); kiln's own command scripts, read by
their name and parameters (``# kiln poll-run`` and ``$runDir = '...'``: see activities/guest/windows_session.py),
whose effects it models rather than interpreting their PowerShell; and the scripts those start, run by
``tests.wsman.powershell`` as processes of the build admin (through WMI: a network logon), the admin elevated (a
scheduled task: a batch logon, which needs the admin's password) or SYSTEM.

What it models of a machine: a file system fed by uploads; a boot time that changes with each boot; ``shutdown``
as shutdown.exe answers (1115 while going down, or 1717 once its RPC interface is gone; 1190 when one is
scheduled; 1116 when there is none to abort); a restart in which its endpoint goes away for ``reboot_seconds``
and comes back; Windows Update with a queue of updates that need restarts (``tests.wsman.updates``); sysprep's
image states. Its clock is scripted: a script's ``Start-Sleep -s 5`` lasts ``5 * time_scale`` real seconds, and
so does everything the settings time.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.wsman.credentials import add_account, self_signed
from tests.wsman.files import FileError, Files, key
from tests.wsman.powershell import PowerShell
from tests.wsman.server import WsmanEndpoint
from tests.wsman.updates import Update, run_round, script_parameters

WINRM_HTTPS_PORT = 5986
MAX_COMMAND_LINE = 8191
GENERALIZED = "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
PowerState = Literal["running", "scheduled", "going_down", "down", "deleted"]


@dataclass(frozen=True)
class Identity:
    """Who a process runs as, and by which logon: WinRM's and WMI's are network logons, a scheduled task's a batch
    logon, SYSTEM's a service's. Its token says so, as ``whoami /groups`` shows."""

    computer: str
    user: str
    logon: Literal["network", "batch", "service"]

    def whoami(self) -> str:
        return "nt authority\\system" if self.user == "SYSTEM" else f"{self.computer.lower()}\\{self.user.lower()}"

    def groups(self) -> str:
        logon = {"network": "NT AUTHORITY\\NETWORK", "batch": "NT AUTHORITY\\BATCH", "service": "NT AUTHORITY\\SERVICE"}
        level = "System Mandatory Level" if self.user == "SYSTEM" else "High Mandatory Level"
        return f"BUILTIN\\Administrators\r\n{logon[self.logon]}\r\nMandatory Label\\{level}"


# What shutdown.exe prints with the codes it answers while the machine goes down.
GOING_DOWN_MESSAGES = {1115: "A system shutdown is in progress.", 1717: "The interface is unknown."}


@dataclass
class MachineSettings:
    """How the machine behaves; every duration is in scripted seconds (times ``time_scale`` in real ones)."""

    time_scale: float = 0.01
    # From `shutdown /r /t 0` to the listener going away, and how long the machine then stays away.
    shutdown_seconds: float = 5.0
    reboot_seconds: float = 20.0
    # What shutdown.exe answers while the machine goes down: 1115 (ERROR_SHUTDOWN_IN_PROGRESS), or 1717
    # (RPC_S_UNKNOWN_IF) on a machine whose shutdown already stopped the RPC interface shutdown.exe talks to.
    going_down_code: int = 1115
    # One update round's download and install.
    install_seconds: float = 20.0
    # How long generalize takes once Sysprep.exe started; stuck: it never reaches the generalized state.
    sysprep_seconds: float = 10.0
    sysprep_stuck: bool = False
    # Offered in waves: wave 2 once an update of wave 1 was installed and the machine restarted, and so on.
    updates: list[Update] = field(default_factory=list)
    # Installing fails with 0x80240016 until the next restart (an installation an earlier step left pending).
    install_blocked: bool = False
    # Every search finds one more update: a machine that keeps asking for a restart.
    endless_updates: bool = False


class Interrupted(Exception):
    """The process was stopped, or its machine restarted or was deleted under it."""


class Process:
    """A command in a WinRM shell: its output waits, in order, until a Receive takes it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._pending: list[tuple[str, bytes]] = []
        self.exit_code: int | None = None
        self.terminated = False

    def write(self, stream: str, text: str | bytes) -> None:
        with self._changed:
            self._pending.append((stream, text.encode() if isinstance(text, str) else text))
            self._changed.notify_all()

    def finish(self, exit_code: int) -> None:
        with self._changed:
            self.exit_code = exit_code
            self._changed.notify_all()

    def terminate(self) -> None:
        self.terminated = True

    def receive(self, *, timeout: float) -> tuple[list[tuple[str, str]], int | None] | None:
        """What came since the last Receive, once there is any or the command ended; None after ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending or self.exit_code is not None, timeout=timeout)
            if not self._pending and self.exit_code is None:
                return None
            chunks = [(stream, base64.b64encode(data).decode()) for stream, data in self._pending]
            self._pending.clear()
            return chunks, self.exit_code


@dataclass
class Run:
    """A script kiln started detached: who runs it, and how often kiln asked for it to start."""

    folder: str
    identity: Identity
    script: str
    generation: int
    starts: int = 1
    killed: bool = False


class WindowsMachine:
    """One Windows VM with its admin account, reachable on ``host`` once ``enable_winrm`` made its listener."""

    def __init__(
        self,
        *,
        computer_name: str,
        admin_user: str,
        admin_password: str,
        host: str,
        folder: Path,
        settings: MachineSettings | None = None,
        port: int = WINRM_HTTPS_PORT,
    ) -> None:
        self.computer_name = computer_name
        self.admin_user, self.admin_password = admin_user, admin_password
        self.host, self.port = host, port
        self.settings = settings or MachineSettings()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.files = Files(
            [
                "C:\\Windows\\Temp",
                "C:\\Windows\\System32\\Sysprep",
                "C:\\Windows\\Panther",
                f"C:\\Users\\{admin_user}",
                "C:\\Program Files",
            ]
        )
        self.power: PowerState = "running"
        self.boots = 1
        self.boot_time = self._clock()
        self.reboot_pending = False
        self.install_blocked = self.settings.install_blocked
        self.installed: list[Update] = []
        self.image_state_value = "IMAGE_STATE_COMPLETE"
        self.sysprep_arguments: str | None = None
        # Every command line the machine ran, PowerShell decoded; and every detached run by its folder.
        self.commands: list[str] = []
        self.longest_command_line = 0
        # The exit code of every shutdown.exe run, in order.
        self.shutdown_codes: list[int] = []
        # Real seconds the machine spent in its scripted time (scripts' sleeps, restarts): its own, not kiln's.
        self.scripted_seconds = 0.0
        self.runs: dict[str, Run] = {}
        self.endpoint: WsmanEndpoint | None = None
        self._generation = 0
        self._lock = threading.RLock()
        self._deleted = threading.Event()
        self._scheduled: threading.Timer | None = None
        self._current = threading.local()
        self._endless = 0
        # A wave of updates is offered once the one before it was installed and the machine restarted.
        self._wave = 1
        add_account(admin_user, admin_password)

    # ---- lifecycle

    def enable_winrm(self) -> str:
        """Make the WinRM HTTPS listener with a self-signed certificate (what kiln's run command asks for), and
        return the certificate's thumbprint."""
        with self._lock:
            if self.endpoint is None:
                certificate = self_signed(self.computer_name)
                self.endpoint = WsmanEndpoint(
                    self, host=self.host, port=self.port, certificate=certificate, folder=self.folder
                )
                if self.power in ("running", "scheduled"):
                    self.endpoint.start()
            return self.endpoint.certificate.thumbprint

    def delete(self) -> None:
        with self._lock:
            self._deleted.set()
            self.power = "deleted"
            self._generation += 1
            if self._scheduled is not None:
                self._scheduled.cancel()
        if self.endpoint is not None:
            self.endpoint.stop()

    def restart(self) -> None:
        """Begin a restart now (``shutdown /r /t 0``, ``Restart-Computer``)."""
        with self._lock:
            if self.power in ("going_down", "down", "deleted"):
                return
            if self._scheduled is not None:
                self._scheduled.cancel()
                self._scheduled = None
            self.power = "going_down"
        threading.Thread(target=self._restart_cycle, daemon=True).start()

    def sleep(self, seconds: float) -> None:
        """Pass ``seconds`` of scripted time in the calling process, which ends there if it is interrupted."""
        start = time.monotonic()
        until = start + seconds * self.settings.time_scale
        check: Callable[[], None] = getattr(self._current, "check", lambda: None)
        try:
            while True:
                check()
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._deleted.wait(min(left, 0.02))
        finally:
            self.scripted_seconds += time.monotonic() - start

    # ---- what scripts reach

    def image_state(self) -> str:
        return self.image_state_value

    def sysprep(self, arguments: str) -> None:
        """Sysprep.exe started: generalize runs in the background (``/quit`` leaves the machine up)."""
        with self._lock:
            self.sysprep_arguments = arguments
            self.image_state_value = "IMAGE_STATE_UNDEPLOYABLE"
        if not self.settings.sysprep_stuck:
            timer = threading.Timer(self.settings.sysprep_seconds * self.settings.time_scale, self._generalized)
            timer.daemon = True
            timer.start()

    def offered_updates(self) -> list[Update]:
        """What a search finds: the updates not installed yet of the waves the machine's restarts unlocked."""
        with self._lock:
            waiting = [u for u in self.settings.updates if not u.installed]
            if not waiting and self.settings.endless_updates:
                self._endless += 1
                waiting = [
                    Update(
                        kb=f"KB59{self._endless:05d}",
                        title=f"Security Update {self._endless} (KB59{self._endless:05d})",
                    )
                ]
                self.settings.updates += waiting
            return [u for u in waiting if u.wave <= self._wave]

    def install(self, updates: list[Update]) -> None:
        with self._lock:
            for update in updates:
                update.installed = True
            self.installed += updates
            self.reboot_pending = True

    # ---- commands from the WinRM service

    def start_command(self, line: str, environment: dict[str, str]) -> Process:
        process = Process()
        generation = self._generation

        def check() -> None:
            if process.terminated or generation != self._generation:
                raise Interrupted()

        def run() -> None:
            self._current.check = check
            try:
                code = self._execute(process, line, environment)
            except Interrupted:
                return
            except Exception:  # a bug of this machine: show it as the command's failure
                process.write("stderr", traceback.format_exc())
                code = 1
            process.finish(code)

        threading.Thread(target=run, daemon=True).start()
        return process

    def _execute(self, process: Process, line: str, environment: dict[str, str]) -> int:
        self.longest_command_line = max(self.longest_command_line, len(line))
        if len(line) > MAX_COMMAND_LINE:
            self.commands.append(line[:200] + "...")
            process.write("stderr", "The command line is too long.\r\n")
            return 1
        text = line.strip()
        if found := re.match(r"(?is)^powershell(?:\.exe)?\s+(.*)$", text):
            return self._powershell(process, found.group(1), environment)
        self.commands.append(text)
        if " & " in text and not text.lower().startswith("shutdown"):  # cmd.exe runs `a & b` one after the other
            code = 0
            for part in text.split(" & "):
                code = self._execute(process, part, environment)
            return code
        if found := re.match(r'(?is)^echo (.*?)( ?)(>>|>)\s*"?([^"]*?)"?\s*$', text):
            data = (found.group(1) + found.group(2) + "\r\n").encode()
            try:
                (self.files.append if found.group(3) == ">>" else self.files.write)(found.group(4), data)
            except FileError:
                process.write("stderr", "The system cannot find the path specified.\r\n")
                return 1
            return 0
        if found := re.match(r"(?is)^echo(?:\s(.*))?$", text):
            process.write("stdout", (found.group(1) or "ECHO is on.") + "\r\n")
            return 0
        if found := re.match(r"(?is)^shutdown(?:\.exe)?\s*(.*)$", text):
            code = self._shutdown(process, found.group(1))
            self.shutdown_codes.append(code)
            return code
        process.write(
            "stderr",
            f"'{text.split()[0]}' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n",
        )
        return 1

    def _powershell(self, process: Process, arguments: str, environment: dict[str, str]) -> int:
        if found := re.search(r"(?i)-(?:EncodedCommand|enc|ec|e)\s+(\S+)", arguments):
            script = base64.b64decode(found.group(1)).decode("utf-16-le")
        elif found := re.search(r"(?is)-(?:Command|c)\s+(.*)$", arguments):
            script = found.group(1).strip().strip('"')
            script = re.sub(r"^&\s*\{(.*)\}$", r"\1", script.strip(), flags=re.S)
        else:
            process.write("stderr", f"this test machine cannot run: powershell {arguments}\r\n")
            return 1
        script = script.removeprefix("$ProgressPreference = 'SilentlyContinue'\n")
        self.commands.append(script)
        verb = re.match(r"# kiln (\S+)", script)
        identity = Identity(self.computer_name, self.admin_user, "network")
        if verb is None:
            return PowerShell(self, identity, process.write).run_command(script)
        handler = getattr(self, "_kiln_" + verb.group(1).replace("-", "_"), None)
        if handler is None:
            process.write("stderr", f"this test machine does not know kiln's {verb.group(1)}\r\n")
            return 1
        return handler(process, script_parameters(script), environment)

    # ---- kiln's commands (activities/guest/windows_session.py)

    def _kiln_restore_upload(self, process: Process, p: dict, environment: dict[str, str]) -> int:
        destination = str(p["destination"])
        folder = key(destination).rsplit("\\", 1)[0]
        if p["createFolder"] == "yes":
            self.files.make_folder(folder)
        if not self.files.is_folder(folder):
            self._remove_quietly(str(p["source"]))
            process.write("stdout", f"kiln: the folder {folder} does not exist\r\n")
            return 3
        if self.files.is_folder(destination):
            self._remove_quietly(str(p["source"]))
            process.write("stdout", f"kiln: {destination} is a folder\r\n")
            return 4
        [data] = self._expand_upload(str(p["source"]))
        self.files.write(destination, data)
        return 0

    def _kiln_test_path(self, process: Process, p: dict, environment: dict[str, str]) -> int:
        process.write("stdout", f"{self.files.exists(str(p['path']))}\r\n")
        return 0

    def _kiln_start_run(self, process: Process, p: dict, environment: dict[str, str]) -> int:
        folder = str(p["runDir"])
        with self._lock:
            if self.files.exists(folder):  # claimed already: this start is a no-op, as kiln's rename makes it
                self._remove_quietly(str(p["source"]))
                if run := self.runs.get(key(folder)):
                    run.starts += 1
                return 0
            if p["runAs"] == "elevated" and environment.get("KILN_TASK_PASSWORD") != self.admin_password:
                self._remove_quietly(str(p["source"]))
                process.write(
                    "stdout",
                    "kiln: could not start the script: (0x8007052E) The user name or password is incorrect.\r\n",
                )
                return 1
            wrapper, script_data = self._expand_upload(str(p["source"]))
            script = script_data.decode("utf-8-sig")
            self.files.make_folder(folder)
            self.files.write(folder + "\\run.ps1", wrapper)
            self.files.write(folder + "\\script.ps1", script.encode())
            self.files.write(folder + "\\boot", f"{self.boot_time}\r\n".encode())
            self.files.write(folder + "\\pid", b"4242\r\n")
            identity = {
                "user": Identity(self.computer_name, self.admin_user, "network"),
                "elevated": Identity(self.computer_name, self.admin_user, "batch"),
                "system": Identity(self.computer_name, "SYSTEM", "service"),
            }[str(p["runAs"])]
            run = Run(folder=key(folder), identity=identity, script=script, generation=self._generation)
            self.runs[run.folder] = run
        threading.Thread(target=self._run, args=(run,), daemon=True).start()
        return 0

    def _kiln_poll_run(self, process: Process, p: dict, environment: dict[str, str]) -> int:
        folder = str(p["runDir"])
        if not self.files.is_folder(folder):
            process.write("stdout", "missing\r\n")
            return 0
        with self._lock:
            if self.files.is_file(folder + "\\exit"):
                status = self.files.read_text(folder + "\\exit").strip()
            elif self.files.read_text(folder + "\\boot").strip() != self.boot_time:
                status = "lost"
            else:
                status = "-"
            output = self.files.read(folder + "\\output.log") if self.files.is_file(folder + "\\output.log") else b""
        offset, chunk = int(p["offset"]), int(p["chunk"])
        process.write("stdout", f"{status}\r\n{base64.b64encode(output[offset : offset + chunk]).decode()}\r\n")
        return 0

    def _kiln_kill_run(self, process: Process, p: dict, environment: dict[str, str]) -> int:
        folder = str(p["runDir"])
        with self._lock:
            run = self.runs.get(key(folder))
            if run is None or self.files.is_file(folder + "\\exit"):
                return 0
            run.killed = True
            self.files.write(folder + "\\exit", b"1\r\n")
        return 0

    def _kiln_boot_check(self, process: Process, p: dict, environment: dict[str, str]) -> int:
        process.write("stdout", f"{self.computer_name} restarted.\r\nkiln-boot: {self.boot_time}\r\n")
        return 0

    def _kiln_fetch_file(self, process: Process, p: dict, environment: dict[str, str]) -> int:
        destination = str(p["destination"])
        folder = key(destination).rsplit("\\", 1)[0]
        if not self.files.is_folder(folder):
            process.write("stdout", f"kiln: the folder {folder} does not exist\r\n")
            return 3
        try:
            with urllib.request.urlopen(str(p["url"]), timeout=60) as answer:
                data = answer.read()
        except OSError as err:
            process.write("stderr", f"Invoke-WebRequest : {err}\r\n")
            return 1
        digest = hashlib.sha256(data).hexdigest()
        if digest != p["sha256"]:
            process.write("stdout", f"kiln: the file arrived with sha256 {digest}, not {p['sha256']}\r\n")
            return 5
        self.files.write(destination, data)
        return 0

    # ---- detached runs

    def _run(self, run: Run) -> None:
        output = run.folder + "\\output.log"

        def check() -> None:
            if run.killed or run.generation != self._generation:
                raise Interrupted()

        def write(stream: str, text: str) -> None:
            check()
            self.files.append(output, text.encode())

        self._current.check = check
        try:
            # The variables a run sets first (Packer's, as kiln's session writes them) come before the script proper.
            if _without_variables(run.script).startswith("# kiln windows-update"):
                code = self._update_round(run, write)
            else:
                code = PowerShell(self, run.identity, write).run_file(run.script)
        except Interrupted:
            return
        with self._lock:
            if not run.killed and run.generation == self._generation:
                self.files.write(run.folder + "\\exit", f"{code}\r\n".encode())

    def _update_round(self, run: Run, write: Callable[[str, str], None]) -> int:
        if run.identity.logon == "network":  # Windows Update refuses network logons
            write("stdout", "ERROR: Exception from HRESULT: 0x80070005 (E_ACCESSDENIED)\r\n")
            return 1
        return run_round(self, _without_variables(run.script), write)

    # ---- shutdown.exe

    def _shutdown(self, process: Process, arguments: str) -> int:
        flags = {f.lower().lstrip("/-") for f in re.findall(r"(?:^|\s)([/-][a-zA-Z])\b", arguments)}
        seconds = re.search(r"[/-]t\s+(\d+)", arguments)
        delay = int(seconds.group(1)) if seconds else 30
        with self._lock:
            if "a" in flags:
                if self.power == "scheduled":
                    assert self._scheduled is not None
                    self._scheduled.cancel()
                    self._scheduled = None
                    self.power = "running"
                    return 0
                if self.power == "going_down":
                    return self._refuse(process, "A system shutdown is in progress.(1115)", 1115)
                return self._refuse(
                    process, "Unable to abort the system shutdown because no shutdown was in progress.(1116)", 1116
                )
            if "r" not in flags:
                return self._refuse(process, f"this test machine only restarts, not: shutdown {arguments}", 1)
            if self.power not in ("running", "scheduled"):
                code = self.settings.going_down_code
                return self._refuse(process, f"{GOING_DOWN_MESSAGES[code]}({code})", code)
            if self.power == "scheduled":
                return self._refuse(process, "A system shutdown has already been scheduled.(1190)", 1190)
            if delay == 0:
                self.restart()
                return 0
            self.power = "scheduled"
            self._scheduled = threading.Timer(delay * self.settings.time_scale, self.restart)
            self._scheduled.daemon = True
            self._scheduled.start()
            return 0

    def _refuse(self, process: Process, message: str, code: int) -> int:
        process.write("stdout", message + "\r\n")
        return code

    def _restart_cycle(self) -> None:
        self.scripted_seconds += (
            self.settings.shutdown_seconds + self.settings.reboot_seconds
        ) * self.settings.time_scale
        if self._deleted.wait(self.settings.shutdown_seconds * self.settings.time_scale):
            return
        if self.endpoint is not None:
            self.endpoint.stop()  # first: no command may reach a machine that is already down
        with self._lock:
            self._generation += 1  # every process dies with the machine
            self.power = "down"
        if self._deleted.wait(self.settings.reboot_seconds * self.settings.time_scale):
            return
        with self._lock:
            self.boots += 1
            self.boot_time = self._clock()
            self.reboot_pending = False
            self.install_blocked = False
            self._wave = 1 + max((u.wave for u in self.installed), default=0)
            self.power = "running"
            if self.endpoint is not None and not self._deleted.is_set():
                self.endpoint.start(after_restart=True)

    # ---- helpers

    def _generalized(self) -> None:
        with self._lock:
            self.image_state_value = GENERALIZED

    def _expand_upload(self, source: str) -> list[bytes]:
        """The files an upload's base64 lines stand for (a ``*`` line between two); the lines go, as kiln's
        restore step removes them."""
        if not self.files.is_file(source):
            return [b""]
        lines = self.files.read_text(source).split()
        self.files.remove(source)
        files = [b""]
        for line in lines:
            if line == "*":
                files.append(b"")
            else:
                files[-1] += base64.b64decode(line)
        return files

    def _remove_quietly(self, path: str) -> None:
        try:
            self.files.remove(path, recurse=True)
        except FileError:
            pass

    def _clock(self) -> str:
        """A boot time as kiln reads it (UTC, round-trip format); distinct for every boot."""
        now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(microseconds=self.boots)
        return now.strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def _without_variables(script: str) -> str:
    """A run's script without the ``$env:NAME='value'`` lines it starts with."""
    return re.sub(r"^(?:\$env:\w+='[^']*'\r?\n)*", "", script.lstrip("\ufeff"))
