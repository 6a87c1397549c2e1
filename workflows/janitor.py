"""The janitor: finishes the cleanup of builds that ended without all of their own.

Terminating a workflow (or a workflow execution timeout someone set) runs no workflow code, so a build ended
that way never ran its undo stack; and an undo that failed for good (a permission missing at the time) is left
stacked by the build. Either way the build's last status still holds what is left (``pendingCleanup``), so the
janitor finds such builds and runs the same undo activities, on the build's own task queue, that the build would
have run. Deletes succeed when the thing is already gone, so running the janitor again is harmless.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.janitor import JanitorActivities
    from workflows.models import AbandonedBuild, JanitorReport, JanitorRequest

UNDO_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1), maximum_attempts=10
)


@workflow.defn(name="KilnJanitor")
class JanitorWorkflow:
    @workflow.run
    async def run(self, request: JanitorRequest) -> JanitorReport:
        abandoned: list[AbandonedBuild] = await workflow.execute_activity_method(
            JanitorActivities.find_abandoned_builds,
            request,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(minutes=1),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        report = JanitorReport()
        for build in abandoned:
            for undo in reversed(build.pending_cleanup):
                try:
                    await workflow.execute_activity(
                        undo.activity,
                        undo.request,
                        task_queue=build.task_queue,
                        # A queue whose cloud has no worker any more must not hold the janitor forever.
                        schedule_to_close_timeout=timedelta(hours=1),
                        start_to_close_timeout=timedelta(minutes=30),
                        heartbeat_timeout=timedelta(seconds=30),
                        retry_policy=UNDO_RETRY,
                        summary=f"{build.workflow_id}: {undo.label}",
                    )
                except ActivityError as err:
                    report.failed.append(f"{build.workflow_id}: {undo.label}: {err.cause or err}")
                else:
                    report.cleaned.append(f"{build.workflow_id}: {undo.label}")
        report.builds = [b.workflow_id for b in abandoned]
        return report
