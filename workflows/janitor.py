"""The janitor: finishes the cleanup of builds that ended without all of their own.

Terminating a workflow (or a workflow execution timeout someone set) runs no workflow code, so a build ended
that way never ran its undo stack; and an undo that failed for good (a permission missing at the time) is left
stacked by the build. Either way the build's last status still holds what is left (``pendingCleanup``), so the
janitor finds such builds and runs the same undo activities, on the build's own task queue, that the build would
have run. Deletes succeed when the thing is already gone, so running the janitor again is harmless.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.janitor import JanitorActivities
    from workflows.models import AbandonedBuild, BuildStatus, JanitorReport, JanitorRequest
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
        return report
