"""The undo registry and the stack's bookkeeping; running undos is tested on a real server (tests/workflows/)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from workflows.models import BuildContext, BuildStatus, DeleteRequest, PendingUndo, StepRecord
from workflows.policies import BUILD_UNDO
from workflows.undo import DELETE_IMAGE, DELETE_STAGING, DELETE_VM, UNDOS, Undo, UndoStack

CONTEXT = BuildContext(build_id="b-1", template_name="golden", location="westeurope", cloud="local")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("undo", UNDOS.values(), ids=list(UNDOS))
def test_each_undo_keeps_the_activity_name_history_records(undo: Undo) -> None:
    """Closed builds' statuses and histories name these activities; @activity.defn names them after the method."""
    assert undo.activity.__name__ == undo.name
    assert UNDOS[undo.name] is undo


def test_the_registry_holds_the_undos_builds_have_always_recorded() -> None:
    assert sorted(UNDOS) == ["delete_image", "delete_output", "delete_staging", "delete_vm"]


def stacked() -> tuple[BuildStatus, UndoStack]:
    status = BuildStatus()
    undos = UndoStack(status, policy=BUILD_UNDO)
    undos.push(DELETE_STAGING, DeleteRequest(build=CONTEXT, name="staging"), owner="staging", label="delete staging")
    undos.push(DELETE_VM, DeleteRequest(build=CONTEXT, name="b-1-build"), owner="b-1-build", label="delete build VM")
    undos.push(DELETE_IMAGE, DeleteRequest(build=CONTEXT, name="b-1-image"), owner="b-1-image", label="delete image")
    return status, undos


def test_a_pushed_undo_is_in_the_status_by_activity_name_with_its_request_as_json() -> None:
    status, _ = stacked()
    assert [(u.owner, u.activity) for u in status.pending_cleanup] == [
        ("staging", "delete_staging"),
        ("b-1-build", "delete_vm"),
        ("b-1-image", "delete_image"),
    ]
    assert status.pending_cleanup[1].request == DeleteRequest(build=CONTEXT, name="b-1-build").model_dump(mode="json")


def test_kept_undos_leave_the_stack_unrun_newest_first() -> None:
    status, undos = stacked()
    kept = undos.keep({"staging", "b-1-build"})
    assert [u.owner for u in kept] == ["b-1-build", "staging"]
    assert [u.owner for u in status.pending_cleanup] == ["b-1-image"]


def failed_step(name: str, message: str) -> StepRecord:
    return StepRecord(name=name, kind="cleanup", started=NOW, ended=NOW, outcome="failed", message=message)


def test_what_is_left_is_each_stacked_undo_that_failed_with_its_last_failure() -> None:
    status, undos = stacked()
    status.pending_cleanup = [u for u in status.pending_cleanup if u.owner != "b-1-image"]
    status.steps += [
        failed_step("cleanup: delete build VM", "permission denied"),  # freed early, and failed
        failed_step("cleanup: delete image", "gone wrong"),  # failed, then succeeded: no longer stacked
        StepRecord(name="cleanup: delete staging", kind="cleanup", started=NOW, outcome="succeeded"),
        failed_step("cleanup: delete build VM", "still denied"),  # the final run
    ]
    assert undos.left() == {"cleanup: delete build VM": "still denied"}


def test_nothing_is_left_by_a_stack_that_never_failed() -> None:
    _, undos = stacked()
    assert undos.left() == {}


def test_a_janitors_stack_names_its_steps_after_the_build() -> None:
    status = BuildStatus(
        pending_cleanup=[PendingUndo(owner="b-1-build", label="delete build VM", activity="delete_vm", request={})]
    )
    undos = UndoStack(status, policy=BUILD_UNDO, prefix="golden")
    status.steps.append(failed_step("golden: delete build VM", "permission denied"))
    assert undos.left() == {"golden: delete build VM": "permission denied"}
