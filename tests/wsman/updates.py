"""Windows Update on the test machine: a queue of updates offered in waves, each wave installable only after a
restart that follows the one before (as cumulative updates follow servicing-stack updates), and what kiln's
update script (activities/guest/windows_update.py) prints and exits with when it meets them."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.wsman.powershell import Write

if TYPE_CHECKING:
    from tests.wsman.machine import WindowsMachine

# What Windows Update throws when asked to install while a restart or another installation is pending.
NOT_ALLOWED = (
    "Exception from HRESULT: 0x80240016 (System.Runtime.InteropServices.COMException (0x80240016): "
    "WU_E_INSTALL_NOT_ALLOWED)"
)


@dataclass
class Update:
    kb: str
    title: str
    wave: int = 1
    size_mb: int = 40
    browse_only: bool = False
    installed: bool = False


def script_parameters(text: str) -> dict[str, object]:
    """The ``$Name = value`` lines a kiln command script starts with: strings, integers and @(string lists)."""
    values: dict[str, object] = {}
    for line in text.lstrip("\ufeff").splitlines()[1:]:
        found = re.match(r"^\$(\w+) = (.*)$", line)
        if not found:
            break
        name, value = found.groups()
        if value.startswith("@("):
            values[name] = [s.replace("''", "'") for s in re.findall(r"'((?:[^']|'')*)'", value)]
        elif value.startswith("'"):
            values[name] = value[1:-1].replace("''", "'")
        else:
            values[name] = int(value)
    return values


def matches(expression: str, update: Update) -> bool:
    """A filter's PowerShell expression on one update, as far as AIB templates write them.

    Raises:
        ValueError: an expression this machine cannot evaluate.
    """
    text = expression.strip()
    if text.lower() in ("$true", "$false"):
        return text.lower() == "$true"
    found = re.fullmatch(r"\$_\.(\w+)\s+-(like|notlike|match|notmatch|eq|ne)\s+'((?:[^']|'')*)'", text, re.IGNORECASE)
    if not found:
        raise ValueError(f"cannot evaluate the filter expression {expression!r}")
    field, operator, pattern = found.group(1).lower(), found.group(2).lower(), found.group(3).replace("''", "'")
    value = {"title": update.title, "kbarticleids": update.kb.removeprefix("KB")}.get(field)
    if value is None:
        raise ValueError(f"this machine's updates have no {found.group(1)}")
    if operator in ("like", "notlike"):
        hit = fnmatch.fnmatchcase(value.lower(), pattern.lower())
    elif operator in ("match", "notmatch"):
        hit = re.search(pattern, value, re.IGNORECASE) is not None
    else:
        hit = value.lower() == pattern.lower()
    return not hit if operator in ("notlike", "notmatch", "ne") else hit


def run_round(machine: WindowsMachine, script: str, write: Write) -> int:
    """One run of kiln's update script: search, filter, install up to the limit, and ask for a restart."""

    def say(line: str) -> None:
        write("stdout", line + "\r\n")

    params = script_parameters(script)
    if machine.reboot_pending:
        say("A restart is pending before updates can be searched.")
        return 101
    criteria = str(params["SearchCriteria"])
    if "isinstalled=0" not in criteria.replace(" ", "").lower():
        say(f"ERROR: the search criteria {criteria!r} are not supported (0x80240032)")
        return 1
    say(f"Searching for Windows updates: {criteria}")
    machine.sleep(machine.settings.install_seconds / 10)
    rules = [tuple(f.split(":", 1)) for f in params["Filters"]]  # type: ignore[union-attr]
    chosen: list[Update] = []
    for update in machine.offered_updates():
        if update.browse_only and "browseonly=0" in criteria.replace(" ", "").lower():
            continue
        try:
            include = next((action == "include" for action, expression in rules if matches(expression, update)), False)
        except ValueError as err:
            say(f"ERROR: {err}")
            return 1
        if not include:
            say(f"Skipped (filter) Windows update ({update.kb}): {update.title}")
            continue
        if len(chosen) >= int(params["UpdateLimit"]):  # type: ignore[call-overload]
            break
        say(f"Found Windows update ({update.kb}; {update.size_mb} MB): {update.title}")
        chosen.append(update)
    if not chosen:
        say("No Windows updates found")
        return 0
    say(f"Downloading {len(chosen)} Windows updates...")
    machine.sleep(machine.settings.install_seconds / 2)
    say(f"Installing {len(chosen)} Windows updates...")
    if machine.install_blocked:
        say(f"ERROR: {NOT_ALLOWED}")
        return 1
    machine.sleep(machine.settings.install_seconds / 2)
    machine.install(chosen)
    say(f"Installed {len(chosen)} Windows updates (result 2; restart required: True)")
    return 101
