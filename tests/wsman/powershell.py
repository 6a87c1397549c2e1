"""Enough of Windows PowerShell to run what the tests' and the corpus's scripts say, with PowerShell's error rules.

Each line is a statement: ``Write-Host``/``Write-Output``/``echo`` (with ``>``/``>>`` into a file), ``mkdir`` and
``New-Item``, ``Set-Content``/``Add-Content``, ``Remove-Item``, ``Test-Path``, ``Get-Content``, ``whoami``,
``Start-Sleep``, ``exit``, ``throw``, ``Write-Error``, ``cmd /c exit N``, ``Restart-Computer``, ``& <script>``, the
in-place edit ``(Get-Content F -Raw) -replace 'a','b' | Set-Content F``, and the shapes of AIB's sysprep script
(waits for the Azure agent's services, ``if (Test-Path ...) { ... }``, ``& ...Sysprep.exe``, the ImageState loop).

As in PowerShell, an unknown command is a statement-terminating error: reported, and the script goes on, unless
it runs inside ``try`` (kiln's inline wrapper, as Packer's), where it ends the script with exit code 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from tests.wsman.files import FileError, Files, expand

# The markers around a template's inline lines in kiln's wrapper (activities/guest/windows.py), which runs them
# inside try { } as Packer's powershell provisioner does.
INLINE_START = "# --- the template's lines"
INLINE_END = "# --- end of the template's lines"

Write = Callable[[str, str], None]


class Identity(Protocol):
    user: str

    def whoami(self) -> str: ...

    def groups(self) -> str: ...


class Host(Protocol):
    """What a script reaches of its machine."""

    computer_name: str
    files: Files

    def sleep(self, seconds: float) -> None: ...

    def sysprep(self, arguments: str) -> None: ...

    def image_state(self) -> str: ...

    def restart(self) -> None: ...


class ScriptExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class StatementError(Exception):
    """An error that ends the statement (and the script, inside try)."""


class ScriptError(Exception):
    """An error that ends the script (``throw``)."""


def split_statements(line: str) -> list[str]:
    """``a; b`` as two statements, keeping ``;`` inside quotes."""
    parts, current, quote = [], "", ""
    for char in line:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ";":
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def words(text: str) -> list[str]:
    """A command's arguments, quotes removed."""
    return [a or b or c for a, b, c in re.findall(r"'((?:[^']|'')*)'|\"([^\"]*)\"|(\S+)", text)]


class PowerShell:
    """Runs scripts as one process of ``identity`` on ``host``, writing to ``write(stream, text)``."""

    def __init__(self, host: Host, identity: Identity, write: Write) -> None:
        self.host = host
        self.identity = identity
        self.write = write
        self.last_exit_code = 0
        self.failed = False
        self.environment: dict[str, str] = {}

    # ---- entry points

    def run_file(self, text: str) -> int:
        """As ``powershell -File``: the exit code is the script's ``exit N``, 1 after a ``throw``, else 0."""
        lines = text.lstrip("\ufeff").splitlines()
        if INLINE_START in lines:
            return self._inline(lines)
        try:
            self._block(lines, inside_try=False)
        except ScriptExit as done:
            return done.code
        except ScriptError as err:
            self._error(str(err))
            return 1
        return 0

    def run_command(self, text: str) -> int:
        """As ``powershell -Command``: 1 if the last statement failed."""
        code = self.run_file(text)
        return code or (1 if self.failed else 0)

    def _inline(self, lines: list[str]) -> int:
        inner = lines[lines.index(INLINE_START) + 1 : lines.index(INLINE_END)]
        try:
            self._block(inner, inside_try=True)
        except ScriptExit as done:
            return done.code
        except (StatementError, ScriptError) as err:
            self._error(f"An error occurred: {err}")
            return 1
        return self.last_exit_code

    # ---- statements

    def _block(self, lines: list[str], *, inside_try: bool) -> None:
        index = 0
        while index < len(lines):
            line = lines[index].strip()
            index += 1
            if not line or line.startswith("#"):
                continue
            opening = re.match(r"(?i)^(if|while)\s*\((.*)\)\s*\{(.*)$", line)
            if opening:
                body, index = self._body(opening.group(3), lines, index)
                self._control(opening.group(1).lower(), opening.group(2), body, inside_try=inside_try)
                continue
            for statement in split_statements(line):
                try:
                    self.failed = False
                    self._statement(statement)
                except StatementError as err:
                    self.failed = True
                    if inside_try:
                        raise
                    self._error(str(err))

    def _body(self, rest: str, lines: list[str], index: int) -> tuple[list[str], int]:
        """The lines of a ``{ ... }`` block that opened with ``rest``, and where the script goes on after it."""
        body, depth, text = [], 1, rest
        while True:
            for position, char in enumerate(text):
                depth += {"{": 1, "}": -1}.get(char, 0)
                if depth == 0:
                    body.append(text[:position])
                    return [b for b in body if b.strip()], index
            body.append(text)
            if index >= len(lines):
                raise ScriptError("Missing closing '}' in statement block.")
            text = lines[index]
            index += 1

    def _control(self, kind: str, condition: str, body: list[str], *, inside_try: bool) -> None:
        if kind == "if":
            if self._condition(condition):
                self._block(body, inside_try=inside_try)
            return
        if "Get-Service" in condition:
            return  # the Azure agent's services are running on this machine
        if condition.strip().lower() == "$true" and any("ImageState" in b for b in body):
            self._image_state_loop(body)
            return
        raise StatementError(f"this test machine cannot run: while ({condition})")

    def _condition(self, condition: str) -> bool:
        text = condition.strip()
        negate = text.lower().startswith("-not ")
        text = re.sub(r"(?i)^-not\s+", "", text).strip().strip("()").strip()
        found = re.match(r"(?i)^Test-Path\s+(.*)$", text)
        if found:
            value = self.host.files.exists(self._path(found.group(1)))
        elif text.lower() in ("$true", "$false"):
            value = text.lower() == "$true"
        else:
            raise StatementError(f"this test machine cannot evaluate: {condition}")
        return value != negate

    def _image_state_loop(self, body: list[str]) -> None:
        """AIB's wait for sysprep: print the image state until it is the generalized one, every 5 seconds."""
        pause = next((float(m.group(1)) for b in body if (m := re.search(r"Start-Sleep -s (\d+)", b))), 5.0)
        while True:
            state = self.host.image_state()
            self._out(state)
            if state == "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE":
                return
            self.host.sleep(pause)

    def _statement(self, statement: str) -> None:
        edit = re.match(
            r"(?i)^\(Get-Content\s+(\S+)\s+-Raw\)\s+-replace\s+'((?:[^']|'')*)'\s*,\s*'((?:[^']|'')*)'\s*\|\s*Set-Content\s+(?:-Path\s+)?(\S+)",
            statement,
        )
        if edit:
            text = self.host.files.read_text(self._path(edit.group(1)))
            text = re.sub(edit.group(2).replace("''", "'"), edit.group(3).replace("''", "'"), text)
            self._write_file(edit.group(4), text, append=False)
            return
        redirect = re.match(r"^(.*?)\s*(>>|>)\s*(\S+)$", statement)
        if redirect and re.match(r"(?i)^(echo|write-output)\b", redirect.group(1)):
            self._write_file(
                redirect.group(3), self._text(redirect.group(1).split(None, 1)[1:]), append=redirect.group(2) == ">>"
            )
            return
        if statement[0] in "'\"":
            self._out(self._expand(" ".join(words(statement))))
            return
        command, _, rest = statement.partition(" ")
        name = command.lower()
        handler = _COMMANDS.get(name)
        if handler is None:
            if name == "&":
                return self._call(rest)
            if assigned := re.match(r"(?i)^\$env:(\w+)\s*=\s*(.*)$", statement):
                self.environment[assigned.group(1).lower()] = self._text([assigned.group(2)])
                return
            if name.startswith("$"):
                return  # another assignment: what it sets is not read later by the scripts run here
            raise StatementError(
                f"The term '{command}' is not recognized as the name of a cmdlet, function, script file, or "
                "operable program."
            )
        handler(self, rest.strip())

    def _call(self, rest: str) -> None:
        target, _, arguments = rest.strip().partition(" ")
        if target.lower().endswith("sysprep.exe"):
            self.host.sysprep(arguments.strip())
            return
        path = self._path(target)
        if not self.host.files.is_file(path):
            raise StatementError(
                f"The term '{target}' is not recognized as the name of a cmdlet, function, script file, or operable program."
            )
        code = PowerShell(self.host, self.identity, self.write).run_file(self.host.files.read_text(path))
        self.last_exit_code = code
        if code:
            raise ScriptExit(code)

    # ---- helpers

    def _out(self, text: str) -> None:
        self.write("stdout", text + "\r\n")

    def _error(self, text: str) -> None:
        self.write("stderr", text + "\r\n")

    def _expand(self, text: str) -> str:
        text = text.replace("$?", "True")
        values = {"username": self.identity.user, "computername": self.host.computer_name.upper(), **self.environment}
        return re.sub(r"(?i)\$env:(\w+)", lambda m: values.get(m.group(1).lower(), expand(m.group(0))), text)

    def _text(self, parts: list[str]) -> str:
        return self._expand(" ".join(words(" ".join(parts))))

    def _path(self, text: str) -> str:
        return expand(self._expand(words(text)[0] if words(text) else text))

    def _write_file(self, target: str, text: str, *, append: bool) -> None:
        path = self._path(target)
        # Windows PowerShell's > writes UTF-16 with a byte order mark.
        data = text.rstrip("\r\n").encode("utf-16-le") + "\r\n".encode("utf-16-le")
        try:
            if append and self.host.files.is_file(path):
                self.host.files.append(path, data)
            else:
                self.host.files.write(path, b"\xff\xfe" + data)
        except FileError as err:
            raise StatementError(str(err)) from None

    def _flags(self, rest: str) -> tuple[dict[str, str | bool], list[str]]:
        """``-Name value`` flags and positional arguments (``-Force`` and the like are flags without a value)."""
        flags: dict[str, str | bool] = {}
        positional: list[str] = []
        items = words(rest)
        switches = {"force", "recurse", "raw", "noprofile"}
        index = 0
        while index < len(items):
            item = items[index]
            if item.startswith("-") and len(item) > 1 and not item[1].isdigit():
                name = item[1:].lower()
                if name in switches or index + 1 >= len(items):
                    flags[name] = True
                else:
                    flags[name] = items[index + 1]
                    index += 1
            else:
                positional.append(item)
            index += 1
        return flags, positional


def _echo(shell: PowerShell, rest: str) -> None:
    shell._out(shell._text([rest]))


def _write_error(shell: PowerShell, rest: str) -> None:
    shell._error(shell._text([rest]))
    shell.failed = True


def _throw(shell: PowerShell, rest: str) -> None:
    raise ScriptError(shell._text([rest]) or "ScriptHalted")


def _exit(shell: PowerShell, rest: str) -> None:
    raise ScriptExit(int(rest.strip() or 0))


def _sleep(shell: PowerShell, rest: str) -> None:
    flags, positional = shell._flags(rest)
    if "milliseconds" in flags or "m" in flags:
        shell.host.sleep(float(flags.get("milliseconds") or flags["m"]) / 1000)
    else:
        shell.host.sleep(float(flags.get("seconds") or flags.get("s") or positional[0]))


def _new_item(shell: PowerShell, rest: str) -> None:
    flags, positional = shell._flags(rest)
    path = shell._path(str(flags.get("path") or positional[0]))
    kind = str(flags.get("itemtype", "file")).lower()
    files = shell.host.files
    if files.exists(path) and not flags.get("force"):
        raise StatementError(f"An item with the specified name {path} already exists.")
    try:
        if kind == "directory":
            files.make_folder(path)
        else:
            files.write(path, str(flags.get("value", "")).encode())
    except FileError as err:
        raise StatementError(str(err)) from None
    shell._out(
        f"    Directory: {path.rsplit(chr(92), 1)[0]}\r\n\r\nMode  Name\r\n----  ----\r\n{'d----' if kind == 'directory' else '-a---'} {path.rsplit(chr(92), 1)[-1]}"
    )


def _mkdir(shell: PowerShell, rest: str) -> None:
    _new_item(shell, f"-ItemType Directory {rest}")


def _set_content(shell: PowerShell, rest: str, *, append: bool = False) -> None:
    flags, positional = shell._flags(rest)
    path = str(flags.get("path") or flags.get("literalpath") or positional[0])
    value = str(flags.get("value") or (positional[1] if len(positional) > 1 else ""))
    data = (shell._expand(value) + "\r\n").encode()
    try:
        if append and shell.host.files.is_file(shell._path(path)):
            shell.host.files.append(shell._path(path), data)
        else:
            shell.host.files.write(shell._path(path), data)
    except FileError as err:
        raise StatementError(str(err)) from None


def _remove_item(shell: PowerShell, rest: str) -> None:
    flags, positional = shell._flags(rest)
    try:
        shell.host.files.remove(
            shell._path(str(flags.get("path") or flags.get("literalpath") or positional[0])),
            recurse=bool(flags.get("recurse")),
        )
    except FileError as err:
        raise StatementError(str(err)) from None


def _test_path(shell: PowerShell, rest: str) -> None:
    shell._out(str(shell.host.files.exists(shell._path(rest))))


def _get_content(shell: PowerShell, rest: str) -> None:
    flags, positional = shell._flags(rest)
    try:
        shell._out(shell.host.files.read_text(shell._path(str(flags.get("path") or positional[0]))).rstrip("\r\n"))
    except FileError as err:
        raise StatementError(str(err)) from None


def _whoami(shell: PowerShell, rest: str) -> None:
    shell._out(shell.identity.groups() if "/groups" in rest.lower() else shell.identity.whoami())
    shell.last_exit_code = 0


def _cmd(shell: PowerShell, rest: str) -> None:
    found = re.match(r"(?i)^/c\s+exit\s+(\d+)\s*$", rest)
    if not found:
        raise StatementError(f"this test machine runs only 'cmd /c exit N', not: cmd {rest}")
    shell.last_exit_code = int(found.group(1))


def _restart(shell: PowerShell, rest: str) -> None:
    shell.host.restart()
    shell.host.sleep(10**6)  # the machine goes away under this script


_COMMANDS: dict[str, Callable[[PowerShell, str], None]] = {
    "write-host": _echo,
    "write-output": _echo,
    "echo": _echo,
    "write-error": _write_error,
    "throw": _throw,
    "exit": _exit,
    "start-sleep": _sleep,
    "new-item": _new_item,
    "mkdir": _mkdir,
    "md": _mkdir,
    "set-content": _set_content,
    "add-content": lambda shell, rest: _set_content(shell, rest, append=True),
    "remove-item": _remove_item,
    "del": _remove_item,
    "test-path": _test_path,
    "get-content": _get_content,
    "whoami": _whoami,
    "cmd": _cmd,
    "cmd.exe": _cmd,
    "restart-computer": _restart,
}
