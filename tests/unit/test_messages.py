"""How a build's status message words its end: pure functions of the status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from temporalio.exceptions import ActivityError, ApplicationError, RetryState

from workflows import messages
from workflows.models import BuildStatus, Resource, RunOutput, RunState, StepRecord

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LOG = "https://s/logs/customization.log"


def step(name: str, outcome: str, *, kind: str = "build") -> StepRecord:
    return StepRecord(name=name, kind=kind, started=NOW, outcome=outcome)  # type: ignore[arg-type]


def activity_error(cause: BaseException) -> ActivityError:
    err = ActivityError(
        "Activity task failed",
        scheduled_event_id=5,
        started_event_id=6,
        identity="worker",
        activity_type="create_vm",
        activity_id="3",
        retry_state=RetryState.NON_RETRYABLE_FAILURE,
    )
    err.__cause__ = cause
    return err


def test_the_last_step_is_the_build_step_that_did_not_succeed_not_a_cleanup() -> None:
    status = BuildStatus(
        steps=[
            step("create staging", "succeeded"),
            step("create build VM", "failed"),
            step("cleanup: delete build VM", "failed", kind="cleanup"),
        ]
    )
    assert messages.last_step(status) == "create build VM"
    assert messages.last_step(BuildStatus(steps=[step("create staging", "succeeded")])) == "create staging"
    assert messages.last_step(BuildStatus()) == "the start"


def test_a_stopped_build_says_where_it_stopped() -> None:
    status = BuildStatus(steps=[step("capture image", "canceled")])
    assert messages.canceled(status) == "Canceled during capture image."
    assert messages.timed_out(status, timeout=timedelta(minutes=80), moved=True) == (
        "The build timed out during capture image: it reached its deadline "
        "(buildTimeoutInMinutes 80, moved by a set_deadline update)."
    )


def test_a_failed_step_is_named_with_its_cause_and_the_log() -> None:
    status = BuildStatus(steps=[step("create build VM", "failed")], log_uri=LOG)
    failure = activity_error(ApplicationError("quota exceeded", non_retryable=True))
    assert messages.failed(status, failure) == f"create build VM failed: quota exceeded Image Build log location: {LOG}"
    # An error the workflow raised itself is its own message.
    own = ApplicationError("The template cannot be built on this source:\nx", non_retryable=True)
    assert messages.failed(BuildStatus(steps=[step("resolve source", "succeeded")]), own) == own.message


def test_an_aborted_build_lists_what_it_kept() -> None:
    status = BuildStatus(kept_on_abort=[Resource(id="/vm/b-1-build", kind="virtualMachine")], log_uri=LOG)
    assert messages.aborted(status, "customize 1/1: packages") == (
        "customize 1/1: packages failed; errorHandling is abort, so the VM and its parts are kept for debugging "
        f"(delete them yourself): /vm/b-1-build. Image Build log location: {LOG}"
    )


def output(name: str, state: str, message: str = "") -> RunOutput:
    return RunOutput(run_output_name=name, type="VHD", provisioning_state=state, message=message)  # type: ignore[arg-type]


def test_the_outcome_follows_the_distribution_targets() -> None:
    assert messages.outcome(BuildStatus(run_outputs=[output("a", "Succeeded")]), validation_failed=False) == (
        RunState.SUCCEEDED,
        "",
    )
    partial = BuildStatus(run_outputs=[output("a", "Succeeded"), output("b", "Failed", "disk full")])
    assert messages.outcome(partial, validation_failed=False) == (
        RunState.PARTIALLY_SUCCEEDED,
        "Failed in distributing 1 images out of total 2: b: disk full",
    )
    none = BuildStatus(run_outputs=[output("b", "Failed", "disk full")])
    assert messages.outcome(none, validation_failed=False)[0] == RunState.FAILED


def test_a_failed_validation_fails_the_build_and_says_whether_it_distributed() -> None:
    status = BuildStatus(message="validate 1/1: check failed: exit 1", run_outputs=[output("a", "Succeeded")])
    assert messages.outcome(status, validation_failed=True) == (
        RunState.FAILED,
        "Validation failed: validate 1/1: check failed: exit 1 Outputs were distributed (continueDistributeOnFailure).",
    )


def test_cleanup_notes_name_each_undo_left_for_the_janitor() -> None:
    assert messages.with_cleanup_notes("Canceled during x.", {}) == "Canceled during x."
    assert messages.with_cleanup_notes("", {"cleanup: delete build VM": "denied"}) == (
        "Cleanup left resources behind, for `kiln janitor` to retry: cleanup: delete build VM: denied"
    )
