"""The janitor's look-up: builds that closed without running their cleanup, and what is left of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.client import WorkflowQueryFailedError
from temporalio.service import RPCError

from workflows.models import AbandonedBuild, BuildStatus, JanitorRequest


class JanitorActivities:
    @activity.defn
    async def find_abandoned_builds(self, request: JanitorRequest) -> list[AbandonedBuild]:
        """Closed builds whose last status still lists undo steps: their workflow code stopped before the end
        (terminated, or timed out by a workflow timeout), or an undo failed for good (say, a permission that was
        missing then). Every closed build is asked, since only its status tells the second kind apart."""
        client = activity.client()
        since = (datetime.now(UTC) - timedelta(hours=request.lookback_hours)).isoformat()
        query = f"WorkflowType = 'ImageBuild' AND ExecutionStatus != 'Running' AND CloseTime > '{since}'"
        if request.task_queue:
            query += f" AND TaskQueue = '{request.task_queue}'"
        abandoned = []
        async for execution in client.list_workflows(query):
            handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
            try:
                # A query on a closed build replays its history on a worker of its queue: its last status, exactly.
                status = await handle.query("status", result_type=BuildStatus, rpc_timeout=timedelta(seconds=10))
            except (RPCError, WorkflowQueryFailedError) as err:
                activity.logger.warning(
                    "%s: its status cannot be read now (%s); left for a later run", execution.id, err
                )
                continue
            if status.pending_cleanup:
                abandoned.append(
                    AbandonedBuild(
                        workflow_id=execution.id,
                        run_id=execution.run_id,
                        task_queue=execution.task_queue,
                        pending_cleanup=status.pending_cleanup,
                    )
                )
            activity.heartbeat()
        return abandoned
