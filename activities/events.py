"""The events a step writes into its log beside its scripts' output: each restart of a Windows build VM and each
Windows Update round, as the builder's notes (``activities.build_log``): ``==> azure-arm: <step>: restart 2: the
machine is back after 41.2 s`` or ``==> azure-arm: <step>: update round 3: installed KB5034441 ...``. They are
written here and read here, so the live view (``kiln build``, ``kiln watch``) picks out exactly what the steps
wrote."""

from __future__ import annotations

import re
from typing import Literal

from activities.build_log import BUILDER, note

Kind = Literal["restart", "update round"]
_EVENT = re.compile(
    rf"^==> {BUILDER}: (?:Provisioning with [\w-]+: )?(?P<step>.+?): "
    r"(?P<event>(?:restart|update round) \d+(?:: (?P<text>.*))?)$"
)


def event_line(step: str, kind: Kind, number: int, text: str) -> bytes:
    """One event of ``step`` (its label in the build's status), as its log holds it."""
    return note(f"{step}: {kind} {number}: {text}")


def parse_event(line: str) -> tuple[str, str] | None:
    """``(step, event)`` of an event line, or None for any other line. A round's start is its script's header
    (``==> azure-arm: Provisioning with windows-update: <step>: update round 2``); its end (``...: exit code
    101``) is left out, as the event after it says what came of it."""
    found = _EVENT.match(line)
    if found is None or re.fullmatch(r"exit code -?\d+", found.group("text") or ""):
        return None
    return found.group("step"), found.group("event")
