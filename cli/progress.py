"""How a build is shown: the live view while it runs, and the status and summary once asked or finished.

On a terminal the live view redraws in place (steps with their elapsed time ticking, the tail of the
customizer's output, and beside a Windows step its latest restart or update round). Anywhere else (a CI log, a
pipe) it prints one line per event instead, so the output reads well as plain text.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import UTC, datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from activities.events import parse_event
from cli.builds import Build, no_worker_note, outcome, query_status
from cli.logs import read_log, sibling_log
from workflows.models import BuildStatus, RunState, RunSubState, StepRecord

POLL_SECONDS = 1.0
CUSTOMIZATION_LOG = "customization.log"
VALIDATION_LOG = "validation.log"
TAIL_LINES = 8

STATE_STYLES = {
    RunState.RUNNING: "cyan",
    RunState.CANCELING: "yellow",
    RunState.SUCCEEDED: "bold green",
    RunState.PARTIALLY_SUCCEEDED: "bold yellow",
    RunState.FAILED: "bold red",
    RunState.CANCELED: "bold yellow",
}
OUTCOME_MARKS = {
    "succeeded": Text("✓", style="green"),
    "failed": Text("✗", style="red"),
    "canceled": Text("⊘", style="yellow"),
}
RUNNING_MARK = Text("▸", style="cyan")
EVENT_MARK = "↻ "


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def step_elapsed(step: StepRecord) -> str:
    return format_duration(((step.ended or datetime.now(UTC)) - step.started).total_seconds())


def build_elapsed(status: BuildStatus) -> str:
    if status.start_time is None:
        return ""
    return format_duration(((status.end_time or datetime.now(UTC)) - status.start_time).total_seconds())


def state_text(status: BuildStatus) -> Text:
    text = Text(status.run_state.value, style=STATE_STYLES.get(status.run_state, ""))
    if not status.finished:
        text.append(f" · {status.run_sub_state.value}", style="dim")
    return text


def first_line(message: str) -> str:
    """A step's message in one row; the summary shows it whole (a failed script's last output lines)."""
    return message.split("\n", 1)[0]


def steps_table(
    status: BuildStatus, *, running_mark: RenderableType | None = None, events: dict[str, str] | None = None
) -> Table:
    """One row per step. The live view passes its one spinner: a spinner animates by its age, so a new one
    made on each refresh would never move; and the latest event of each step (a Windows restart or update
    round), which a running step shows where a finished one shows its message."""
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1))
    table.add_column(width=1)
    table.add_column(ratio=2, no_wrap=True, overflow="ellipsis")
    table.add_column(justify="right", no_wrap=True)
    table.add_column(ratio=3, style="dim", no_wrap=True, overflow="ellipsis")
    for step in status.steps:
        mark = (running_mark or RUNNING_MARK) if step.outcome == "running" else OUTCOME_MARKS[step.outcome]
        note = first_line(step.message)
        if step.outcome == "running" and not note and events and step.name in events:
            note = EVENT_MARK + events[step.name]
        table.add_row(mark, Text(step.name), step_elapsed(step), Text(note))
    return table


class BuildView:
    """What the live view draws; rich calls ``__rich__`` on each refresh, so elapsed times tick between polls."""

    def __init__(self, name: str, *, footer: str) -> None:
        self.name = name
        self.footer = footer
        self.status: BuildStatus | None = None
        self.note = ""
        self.log_note = ""
        self.log_name = CUSTOMIZATION_LOG
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        # Each step's latest event in its log, by the step's name.
        self.events: dict[str, str] = {}
        self.spinner = Spinner("dots", style="cyan")

    def __rich__(self) -> RenderableType:
        finished = self.status is not None and self.status.finished
        parts: list[RenderableType] = []
        # Once finished, the summary printed below carries the headline; the frame keeps steps and log.
        if not finished:
            header = Text.assemble((self.name, "bold"), "  ")
            if self.status is None:
                header.append("waiting for the build's status…", style="dim")
            else:
                header.append_text(state_text(self.status))
                header.append(f"  {build_elapsed(self.status)}", style="dim")
            parts.append(header)
        if self.status is not None:
            parts.append(steps_table(self.status, running_mark=self.spinner, events=self.events))
        if self.tail:
            lines = Text("\n").join(Text.from_ansi(line, no_wrap=True, overflow="ellipsis") for line in self.tail)
            parts.append(Panel(lines, title=self.log_name, title_align="left", border_style="dim"))
        if self.note:
            parts.append(Text(self.note, style="yellow"))
        if not finished:
            parts.append(Text(self.footer, style="dim"))
        return Group(*parts)


class EventPrinter:
    """The live view for a console that is not a terminal: each step start, end, state change and log line once."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started: set[int] = set()
        self.ended: set[int] = set()
        self.state = ""
        self.note = ""

    def update(self, status: BuildStatus | None, note: str, lines: list[str]) -> None:
        # The log is read before the status, so its lines come first: they never belong to a later step.
        for line in lines:
            event = parse_event(line)
            if event is not None:  # a restart or an update round: news of its own, not script output
                self.console.print(
                    Text(f"  {EVENT_MARK}", style="cyan") + Text(f"{event[0]}: {event[1]}"), soft_wrap=True
                )
            else:
                self.console.print(Text("  │ ", style="dim") + Text.from_ansi(line), soft_wrap=True)
        if status is not None:
            for index, step in enumerate(status.steps):
                if step.outcome == "running" and index not in self.started:
                    self.started.add(index)
                    self.console.print(Text(f"→ {step.name}"))
                elif step.outcome != "running" and index not in self.ended:
                    self.started.add(index)
                    self.ended.add(index)
                    line = Text.assemble(OUTCOME_MARKS[step.outcome], f" {step.name} ({step_elapsed(step)})")
                    if step.message:
                        line.append(f": {first_line(step.message)}", style="dim")
                    self.console.print(line)
            state = state_text(status).plain
            # The final state is the summary's headline; only the changes on the way are printed here.
            if state != self.state and not status.finished:
                self.console.print(Text(state, style=STATE_STYLES.get(status.run_state, "")))
            self.state = state
        if note and note != self.note:
            self.console.print(Text(note, style="yellow"), soft_wrap=True)
        self.note = note


class LogTail:
    """Reads logs from where the last read of each stopped and hands back only new, complete lines."""

    def __init__(self) -> None:
        self.positions: dict[str, tuple[int, bytes]] = {}

    async def poll(self, uri: str) -> list[str]:
        offset, partial = self.positions.get(uri, (0, b""))
        try:
            data = await read_log(uri, offset)
        except FileNotFoundError:
            return []  # not written yet
        *complete, partial = (partial + data).split(b"\n")
        self.positions[uri] = (offset + len(data), partial)
        # Progress bars redraw with \r; keep only what a terminal would finally show.
        return [line.decode(errors="replace").rstrip("\r").rsplit("\r", 1)[-1] for line in complete]


async def read_new_lines(tail: LogTail, view: BuildView) -> list[str]:
    """New lines of the log the view shows (none before the build has staging storage)."""
    if view.status is None or not view.status.log_uri:
        return []
    uri = sibling_log(view.status.log_uri, view.log_name)
    try:
        lines = await tail.poll(uri)
    except Exception as err:  # a log that cannot be read must not end the view
        view.log_note = f"cannot read {uri}: {err}"
        return []
    view.log_note = ""
    view.tail.extend(lines)
    for line in lines:
        if (event := parse_event(line)) is not None:
            view.events[event[0]] = event[1]
    return lines


async def follow(build: Build, console: Console, *, footer: str, interrupted: str) -> BuildStatus:
    """Show a build until it ends and return its final status.

    Args:
        footer: the line under the live view (what Ctrl-C does).
        interrupted: printed when the user stops watching with Ctrl-C; the build itself is left alone.
    """
    view = BuildView(build.handle.id, footer=footer)
    printer = None if console.is_terminal else EventPrinter(console)
    tail = LogTail()
    live = Live(view, console=console, refresh_per_second=4) if printer is None else None
    try:
        if live is not None:
            live.start()
        while True:
            # The log before the status: shown in that order, no log line is ahead of the steps above it.
            lines = await read_new_lines(tail, view)
            await build.refresh()
            status = await query_status(build)
            if status is None and not build.running:
                status = await outcome(build)  # closed, and no worker left to answer the query
            if status is None:
                view.note = no_worker_note(build)
            else:
                view.status, view.note = status, view.log_note
                if status.run_sub_state == RunSubState.VALIDATING and view.log_name != VALIDATION_LOG:
                    view.log_name = VALIDATION_LOG  # validators write their own log; it is the news from now on
                    view.tail.clear()
                if status.finished:
                    lines += await read_new_lines(tail, view)  # the last words
            if printer is not None:
                printer.update(view.status, view.note, lines)
            if status is not None and status.finished:
                return status
            await asyncio.sleep(POLL_SECONDS)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task
        if live is not None:
            live.stop()
            live = None
        console.print(Text(interrupted, style="yellow"), soft_wrap=True)
        raise
    finally:
        if live is not None:
            live.stop()


def summary(status: BuildStatus, *, with_steps: bool = False) -> Group:
    """A build's outcome: state and message, its run outputs, what it left behind, where its log is."""
    parts: list[RenderableType] = []
    headline = Text.assemble((status.template_name, "bold"), "  ", state_text(status))
    if elapsed := build_elapsed(status):
        headline.append(f"  {elapsed}", style="dim")
    parts.append(headline)
    if status.message:
        parts.append(Text(status.message))
    details = Table.grid(padding=(0, 2))
    details.add_column(style="dim")
    details.add_column()
    for label, value in (
        ("build id", status.build_id),
        ("cloud", status.cloud),
        ("started", status.start_time.astimezone().strftime("%Y-%m-%d %H:%M:%S") if status.start_time else ""),
        ("source version", status.source_exact_version),
        ("staging", status.exact_staging_resource_group),
    ):
        if value:
            details.add_row(label, Text(value))
    if details.row_count:
        parts.append(details)
    if with_steps and status.steps:
        parts.append(Text("\nSteps", style="bold"))
        parts.append(steps_table(status))
    if status.run_outputs:
        outputs = Table(title="Run outputs", title_justify="left", title_style="bold")
        notes = any(out.replication or out.message for out in status.run_outputs)
        for column in ("runOutputName", "type", "state", "artifact", "replication" if notes else None):
            if column:
                outputs.add_column(column, overflow="fold")
        for out in status.run_outputs:
            row = [
                Text(out.run_output_name),
                Text(out.type),
                Text(out.provisioning_state, style="green" if out.provisioning_state == "Succeeded" else "red"),
                Text(out.artifact_id or out.artifact_uri),
            ]
            if notes:
                row.append(
                    Text(", ".join(f"{region}: {state}" for region, state in out.replication.items()) or out.message)
                )
            outputs.add_row(*row)
        parts.append(outputs)
    if status.resources:
        title = "Resources left behind" if status.finished else "Resources"
        parts.append(resource_table(title, status))
    if status.kept_on_abort:
        kept = resource_table("Kept for debugging (errorHandling: abort), delete them yourself", status, kept=True)
        parts.append(kept)
    if status.log_uri:
        parts.append(Text.assemble(("log ", "dim"), status.log_uri))
    return Group(*parts)


def resource_table(title: str, status: BuildStatus, *, kept: bool = False) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for column in ("kind", "id", "owner"):
        table.add_column(column, overflow="fold")
    for resource in status.kept_on_abort if kept else status.resources:
        table.add_row(Text(resource.kind), Text(resource.id), Text(resource.owner))
    return table
