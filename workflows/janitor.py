"""The janitor: finishes the cleanup of builds that ended without all of their own.

Terminating a workflow (or a workflow execution timeout someone set) runs no workflow code, so a build ended
that way never ran its undo stack; and an undo that failed for good (a permission missing at the time) is left
stacked by the build. Either way the build's last status still holds what is left (``pendingCleanup``), so the
janitor finds such builds and runs the same undo activities, on the build's own task queue, that the build would
have run. Then it sweeps by tag: what a closed build made that no undo names (made, then the build terminated
before it recorded the undo) still carries the build's id, and each cloud's worker deletes what of it is temporary;
outputs and logs stay. Deletes succeed when the thing is already gone, so running the janitor again is harmless.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.janitor import JanitorActivities, SweepActivities
    from workflows.models import AbandonedBuild, BuildStatus, ClosedBuild, JanitorReport, JanitorRequest
    from workflows.plan import cause_of
    from workflows.policies import JANITOR_FIND_HEARTBEAT, JANITOR_FIND_RETRY, JANITOR_FIND_TIMEOUT, JANITOR_UNDO
    from workflows.undo import UndoStack


@workflow.defn(name="KilnJanitor")
class JanitorWorkflow:
    """One pass over the builds that closed within the request's lookback."""

    @workflow.run
    async def run(self, request: JanitorRequest) -> JanitorReport:
        abandoned: list[AbandonedBuild] = await workflow.execute_activity_method(
            JanitorActivities.find_abandoned_builds,
            request,
            start_to_close_timeout=JANITOR_FIND_TIMEOUT,
            heartbeat_timeout=JANITOR_FIND_HEARTBEAT,
            retry_policy=JANITOR_FIND_RETRY,
        )
        report = JanitorReport()
        for build in abandoned:
            # A copy of what the build's last status left to undo; each undo step is named by the build.
            leftover = BuildStatus(pending_cleanup=list(build.pending_cleanup))
            undos = UndoStack(leftover, policy=JANITOR_UNDO, task_queue=build.task_queue, prefix=build.workflow_id)
            await undos.run_all()
            report.cleaned += [step.name for step in leftover.steps if step.outcome == "succeeded"]
            report.failed += [f"{name}: {why}" for name, why in undos.left().items()]
        report.builds = [b.workflow_id for b in abandoned]
        if workflow.patched("sweep-by-tag"):  # a janitor pass begun before the sweep existed replays without it
            await self._sweep(request, report)
        return report

    async def _sweep(self, request: JanitorRequest, report: JanitorReport) -> None:
        """Delete what closed builds left that no undo names, found by their build-id tag on each build's queue."""
        closed: list[ClosedBuild] = await workflow.execute_activity_method(
            JanitorActivities.find_closed_builds,
            request,
            start_to_close_timeout=JANITOR_FIND_TIMEOUT,
            retry_policy=JANITOR_FIND_RETRY,
        )
        for build in closed:
            try:
                deleted = await workflow.execute_activity_method(
                    SweepActivities.delete_tagged,
                    build,
                    task_queue=build.task_queue,
                    schedule_to_close_timeout=JANITOR_UNDO.schedule_to_close_timeout,
                    start_to_close_timeout=JANITOR_UNDO.start_to_close_timeout,
                    heartbeat_timeout=JANITOR_UNDO.heartbeat_timeout,
                    retry_policy=JANITOR_UNDO.retry_policy,
                    cancellation_type=JANITOR_UNDO.cancellation_type,
                )
            except ActivityError as err:
                report.failed.append(f"{build.workflow_id}: delete by tag: {cause_of(err)}")
                continue
            report.swept += [f"{build.workflow_id}: {resource}" for resource in deleted]
