"""What a build's status message says: how it ended, which step failed and why, and what its cleanup left.

Pure functions of the status, worded as AIB words lastRunStatus.message where AIB has a wording.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.exceptions import ActivityError

from workflows.models import BuildStatus, RunState
from workflows.plan import cause_of


def invalid_template(issues: str) -> str:
    """A template refused before anything was made; ``issues`` lists every problem, one a line."""
    return f"The template is not valid:\n{issues}"


def canceled(status: BuildStatus) -> str:
    """A cancelled build, by the step the cancel stopped."""
    return f"Canceled during {last_step(status)}."


def timed_out(status: BuildStatus, *, timeout: timedelta, moved: bool) -> str:
    """The build reached its deadline: ``timeout`` is buildTimeoutInMinutes, ``moved`` whether an update moved it."""
    minutes = int(timeout.total_seconds() // 60)
    by_update = ", moved by a set_deadline update" if moved else ""
    return (
        f"The build timed out during {last_step(status)}: it reached its deadline "
        f"(buildTimeoutInMinutes {minutes}{by_update})."
    )


def step_failed(step: str, cause: str) -> str:
    """One step's failure, as AIB names it: the step, then the cause."""
    return f"{step} failed: {cause}"


def failed(status: BuildStatus, failure: BaseException) -> str:
    """A step failed for good, or the workflow refused the build itself (a template the source cannot take)."""
    step = last_step(status)
    cause = cause_of(failure)
    # An error the workflow raised itself is not a step's failure.
    own = not isinstance(failure, ActivityError)
    message = cause if own or cause.startswith(step) else step_failed(step, cause)
    return message if status.log_uri in message else f"{message} {log_hint(status)}".strip()


def aborted(status: BuildStatus, step: str) -> str:
    """``step`` failed and errorHandling is abort: what was kept for debugging (``status.kept_on_abort``)."""
    kept = ", ".join(r.id for r in status.kept_on_abort) or "the VM"
    return (
        f"{step} failed; errorHandling is abort, so the VM and its parts are kept for debugging "
        f"(delete them yourself): {kept}. {log_hint(status)}"
    )


def outcome(status: BuildStatus, *, validation_failed: bool) -> tuple[RunState, str]:
    """How a build that ran to its end came out, from its validation and its distribution targets."""
    outputs = status.run_outputs
    failures = [o for o in outputs if o.provisioning_state == "Failed"]
    if validation_failed:
        distributed = " Outputs were distributed (continueDistributeOnFailure)." if outputs else ""
        return RunState.FAILED, f"Validation failed: {status.message}{distributed}"
    if not failures:
        return RunState.SUCCEEDED, ""
    summary = "; ".join(f"{o.run_output_name}: {o.message}" for o in failures)
    state = RunState.FAILED if len(failures) == len(outputs) else RunState.PARTIALLY_SUCCEEDED
    return state, f"Failed in distributing {len(failures)} images out of total {len(outputs)}: {summary}"


def with_cleanup_notes(message: str, left: dict[str, str]) -> str:
    """``message``, then each undo the cleanup left (``UndoStack.left()``) with why, for the janitor to retry."""
    if not left:
        return message
    notes = "; ".join(f"{name}: {why}" for name, why in left.items())
    return f"{message} Cleanup left resources behind, for `kiln janitor` to retry: {notes}".strip()


def last_step(status: BuildStatus) -> str:
    """The build step a stop or failure happened in: the last one that did not succeed, else the last one."""
    work = [s for s in status.steps if s.kind == "build"]
    for step in reversed(work):
        if step.outcome in ("failed", "canceled", "running"):
            return step.name
    return work[-1].name if work else "the start"


def log_hint(status: BuildStatus) -> str:
    """Where customization.log is, as AIB's message ends with it; empty before staging made it."""
    return f"Image Build log location: {status.log_uri}" if status.log_uri else ""
