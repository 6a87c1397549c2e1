"""The undo stack: every create registers its undo before it runs, and the undos run newest first.

Each kind of undo is an activity and the request model it takes. A build's status holds its stack as
``PendingUndo`` entries naming the activity as history records it (``delete_vm``): the janitor finishes what a
closed build left from that status alone, so those names never change.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, is_cancelled_exception

from activities.build_vm import BuildVmActivities
from activities.capture import CaptureActivities
from activities.distribute import DistributeActivities
from activities.staging import StagingActivities
from workflows.camel import CamelModel
from workflows.metrics import BuildMetrics
from workflows.models import BuildStatus, DeleteOutputRequest, DeleteRequest, PendingUndo, StepRecord
from workflows.plan import cause_of
from workflows.policies import UndoPolicy
from workflows.recorded import rebuild

R = TypeVar("R", bound=CamelModel)


@dataclass(frozen=True)
class Undo(Generic[R]):
    """One kind of undo: the activity that deletes what a create made, and the request it takes."""

    name: str  # the activity's name, as history and PendingUndo.activity record it
    activity: Callable[[Any, R], Awaitable[None]]
    request: type[R]


DELETE_STAGING = Undo("delete_staging", StagingActivities.delete_staging, DeleteRequest)
DELETE_VM = Undo("delete_vm", BuildVmActivities.delete_vm, DeleteRequest)
DELETE_IMAGE = Undo("delete_image", CaptureActivities.delete_image, DeleteRequest)
DELETE_OUTPUT = Undo("delete_output", DistributeActivities.delete_output, DeleteOutputRequest)
UNDOS: dict[str, Undo[Any]] = {undo.name: undo for undo in (DELETE_STAGING, DELETE_VM, DELETE_IMAGE, DELETE_OUTPUT)}


class UndoStack:
    """The undos of one build, kept in its status: ``pendingCleanup`` is what is left to undo, each undo run is
    a cleanup step, and the resources an undo deleted leave ``resources``.

    The janitor runs what a closed build left the same way, on a copy of the build's last status.

    Args:
        status: the status the stack lives in.
        policy: how each undo activity runs.
        task_queue: where the undo activities run; None for the workflow's own queue.
        prefix: what each undo step's name starts with, before the undo's label.
        metrics: where the resources it deletes are counted; by default metrics of its own.
    """

    def __init__(
        self,
        status: BuildStatus,
        *,
        policy: UndoPolicy,
        task_queue: str | None = None,
        prefix: str = "cleanup",
        metrics: BuildMetrics | None = None,
    ) -> None:
        self._status = status
        self._metrics = metrics  # None: made on first use, inside the workflow
        self._policy = policy
        self._task_queue = task_queue
        self._prefix = prefix

    def push(self, undo: Undo[R], request: R, *, owner: str, label: str) -> None:
        """Register an undo before the create it undoes runs: a create that dies half-way still gets cleaned up.

        Args:
            undo: the kind of undo.
            request: what its activity deletes; names derive from the build id, so it works even if the create
                never returned.
            owner: the create's name; the resources the create made carry it.
            label: the undo as the status shows it (``delete build VM``).
        """
        self._status.pending_cleanup.append(
            PendingUndo(owner=owner, label=label, activity=undo.name, request=request.model_dump(mode="json"))
        )

    async def run_early(self, owner: str) -> None:
        """Run ``owner``'s undo now (the build VM once it is captured) and take it off the stack. If it fails for
        good it stays stacked, and the final run tries it again.

        Raises:
            ActivityError: the build was cancelled meanwhile; the undo stays stacked.
        """
        undo = next(u for u in self._status.pending_cleanup if u.owner == owner)
        if await self._run(undo, stop_on_cancel=True):
            self._status.pending_cleanup.remove(undo)

    def keep(self, owners: Collection[str]) -> list[PendingUndo]:
        """Take the undos of ``owners`` off the stack unrun: what they made is kept on purpose (a finished output,
        a VM kept for debugging).

        Returns:
            The undos taken off, newest first.
        """
        kept = [u for u in reversed(self._status.pending_cleanup) if u.owner in owners]
        for undo in kept:
            self._status.pending_cleanup.remove(undo)
        return kept

    async def run_all(self) -> None:
        """Run every undo still stacked, newest first. Each one's failure, even a cancel, is recorded and the rest
        still run: a cleanup is never cut short. Those that failed stay stacked, for the janitor."""
        for undo in reversed(list(self._status.pending_cleanup)):
            if await self._run(undo, stop_on_cancel=False):
                self._status.pending_cleanup.remove(undo)

    def left(self) -> dict[str, str]:
        """What the cleanup left: each undo still stacked whose last run failed, by its step's name, with why."""
        pending = {self._step_name(u) for u in self._status.pending_cleanup}
        return {
            s.name: s.message
            for s in self._status.steps
            if s.kind == "cleanup" and s.name in pending and s.outcome == "failed"
        }

    def _step_name(self, undo: PendingUndo) -> str:
        return f"{self._prefix}: {undo.label}"

    async def _run(self, undo: PendingUndo, *, stop_on_cancel: bool) -> bool:
        """Run one undo, recording it as a cleanup step; False if it failed for good (the janitor's to finish)."""
        record = StepRecord(name=self._step_name(undo), kind="cleanup", started=workflow.now())
        self._status.steps.append(record)
        kind = UNDOS[undo.activity]
        policy = self._policy
        try:
            await workflow.execute_activity_method(
                kind.activity,
                rebuild(kind.request, undo.request),
                task_queue=self._task_queue,
                schedule_to_close_timeout=policy.schedule_to_close_timeout,
                start_to_close_timeout=policy.start_to_close_timeout,
                heartbeat_timeout=policy.heartbeat_timeout,
                retry_policy=policy.retry_policy,
                cancellation_type=policy.cancellation_type,
                summary=record.name,
            )
        except ActivityError as err:
            if stop_on_cancel and is_cancelled_exception(err):  # the build stopped while it freed a VM early
                record.outcome, record.ended = "canceled", workflow.now()
                raise
            # A non-retryable error (say, a lost permission), or retries run out: the janitor retries it later.
            record.outcome, record.message, record.ended = "failed", cause_of(err), workflow.now()
            workflow.logger.warning("%s failed, left for the janitor: %s", undo.label, record.message)
            return False
        record.outcome, record.ended = "succeeded", workflow.now()
        deleted = [r for r in self._status.resources if r.owner == undo.owner]
        self._metrics = self._metrics or BuildMetrics()
        self._metrics.deleted((r.kind for r in deleted), self._status.cloud)
        self._status.resources = [r for r in self._status.resources if r.owner != undo.owner]
        return True
