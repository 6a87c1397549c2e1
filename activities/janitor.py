"""The janitor's look-up: builds that closed without running their cleanup, and what is left of it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    WorkflowExecution,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError, RPCStatusCode

from workflows.models import AbandonedBuild, BuildStatus, JanitorRequest

QUERY_TIMEOUT = timedelta(seconds=10)
# Each query replays a build's history on a worker: a few at a time, not hundreds.
CONCURRENT_QUERIES = 8


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
        executions = [execution async for execution in client.list_workflows(query)]
        # A queue with no worker answers no query; after the first one times out, its builds wait for a later run.
        unanswered: set[str] = set()
        limit = asyncio.Semaphore(CONCURRENT_QUERIES)

        async def last_status(execution: WorkflowExecution) -> BuildStatus | None:
            async with limit:
                if execution.task_queue in unanswered:
                    return None
                handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
                try:
                    # A query on a closed build replays its history on a worker of its queue: its last status.
                    return await handle.query("status", result_type=BuildStatus, rpc_timeout=QUERY_TIMEOUT)
                except (RPCError, WorkflowQueryFailedError) as err:
                    if isinstance(err, RPCError) and err.status == RPCStatusCode.DEADLINE_EXCEEDED:
                        unanswered.add(execution.task_queue)
                    activity.logger.warning(
                        "%s: its status cannot be read now (%s); left for a later run", execution.id, err
                    )
                    return None
                finally:
                    activity.heartbeat()

        statuses = await asyncio.gather(*(last_status(e) for e in executions))
        return [
            AbandonedBuild(
                workflow_id=execution.id,
                run_id=execution.run_id,
                task_queue=execution.task_queue,
                pending_cleanup=status.pending_cleanup,
            )
            for execution, status in zip(executions, statuses, strict=True)
            if status is not None and status.pending_cleanup
        ]


async def schedule_janitor(client: Client, *, cloud: str, task_queue: str, every: timedelta) -> str:
    """Run the janitor for ``cloud``'s builds every ``every``; a schedule already there is brought up to date.

    Returns:
        The schedule's id (``kiln-janitor-<cloud>``).
    """
    schedule_id = f"kiln-janitor-{cloud}"
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            "KilnJanitor", JanitorRequest(task_queue=task_queue), id=schedule_id, task_queue=task_queue
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(catchup_window=every),
    )
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(schedule_id).update(lambda _: ScheduleUpdate(schedule=schedule))
    return schedule_id
