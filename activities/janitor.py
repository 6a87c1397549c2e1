"""The janitor's look-ups: builds that closed without running their cleanup, and what is left of it; every
closed build, for the sweep of what still carries its build id."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

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

from activities.common import CloudActivities, heartbeating
from workflows.models import AbandonedBuild, BuildStatus, ClosedBuild, JanitorRequest
from workflows.plan import build_id_of

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
        executions = [execution async for execution in client.list_workflows(_closed_builds_query(request))]
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

    @activity.defn
    async def find_closed_builds(self, request: JanitorRequest) -> list[ClosedBuild]:
        """Every build that closed within the lookback, by its listing alone: its build id is its resources'
        tag, so the sweep by tag needs nothing from its status."""
        return [
            ClosedBuild(
                workflow_id=execution.id,
                task_queue=execution.task_queue,
                build_id=build_id_of(execution.id, execution.run_id),
            )
            async for execution in activity.client().list_workflows(_closed_builds_query(request))
        ]


def janitor_activities() -> list[Callable[..., Any]]:
    """The janitor's look-ups, for a worker to run beside its cloud's activities."""
    janitor = JanitorActivities()
    return [janitor.find_abandoned_builds, janitor.find_closed_builds]


class SweepActivities(CloudActivities):
    """The janitor's sweep by tag, on each cloud's worker: it runs on the closed build's own task queue."""

    @activity.defn
    async def delete_tagged(self, build: ClosedBuild) -> list[str]:
        async with heartbeating():
            return await self.cloud.delete_tagged(build.build_id)


def _closed_builds_query(request: JanitorRequest) -> str:
    """The visibility query of the builds that closed within the request's lookback (on its queue, if given)."""
    since = (datetime.now(UTC) - timedelta(hours=request.lookback_hours)).isoformat()
    query = f"WorkflowType = 'ImageBuild' AND ExecutionStatus != 'Running' AND CloseTime > '{since}'"
    if request.task_queue:
        query += f" AND TaskQueue = '{request.task_queue}'"
    return query


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
