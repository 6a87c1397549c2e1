"""Output versions over time: the lineage every template entity holds, read in one place, and the gallery
version lifecycle (revoke, end of life, delete) on the worker's cloud."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.common import CloudActivities, heartbeating
from workflows.golden_models import OutputLineage, RetireRequest, TemplateLineage, TemplateState

ENTITY_QUERY = "WorkflowType = 'ImageTemplate' AND ExecutionStatus = 'Running'"
QUERY_TIMEOUT = timedelta(seconds=5)
# How a query to a task queue with no worker ends: at once (no poller seen), or at the timeout.
UNANSWERED = (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED, RPCStatusCode.FAILED_PRECONDITION)


def lineage_of(state: TemplateState) -> TemplateLineage:
    """What template ``state`` made, each output with the revision, source and staged files behind it."""
    source = state.current.template.get("properties", {}).get("source", {})
    pinned = str(source.get("imageVersionId", "")) if source.get("type") == "SharedImageVersion" else ""
    built = [r for r in state.runs if r.build and r.source_image_id]
    outputs = [
        OutputLineage(
            version_id=output.artifact_id,
            type=output.type,
            run_output_name=output.run_output_name,
            template=state.name,
            build=run.build,
            run=run.number,
            revision=run.revision,
            source_image_id=run.source_image_id,
            source_exact_version=run.source_exact_version,
            artifacts=run.artifacts,
            made=run.end_time,
            retired=state.retired.get(output.artifact_id),
        )
        for run in state.runs
        for output in run.run_outputs
        if output.provisioning_state == "Succeeded" and output.artifact_id
    ]
    return TemplateLineage(
        name=state.name,
        cloud=state.cloud,
        pinned_source="" if pinned.lower().endswith("/versions/latest") else pinned,
        last_source=built[-1].source_image_id if built else "",
        outputs=outputs,
    )


async def read_templates(client: Client, *, task_queue: str | None = None) -> tuple[list[TemplateState], set[str]]:
    """Every template (of one cloud's task queue, if given) as its entity holds it, and the task queues whose
    templates could not be read. A queue with no worker answers no query: after its first silence its templates
    are left out, not waited for."""
    query = ENTITY_QUERY + (f" AND TaskQueue = '{task_queue}'" if task_queue else "")
    found: list[TemplateState] = []
    silent: set[str] = set()
    async for execution in client.list_workflows(query):
        if execution.task_queue in silent:
            continue
        try:
            state = await client.get_workflow_handle(execution.id).query(
                "describe", result_type=TemplateState, rpc_timeout=QUERY_TIMEOUT
            )
        except RPCError as err:
            if err.status not in UNANSWERED:
                raise
            silent.add(execution.task_queue)
            continue
        found.append(state)
    return found, silent


async def read_lineage(client: Client, *, task_queue: str | None = None) -> list[TemplateLineage]:
    """The lineage of every template that answers (of one cloud's task queue, if given)."""
    states, _ = await read_templates(client, task_queue=task_queue)
    return [lineage_of(state) for state in states]


@activity.defn
async def collect_lineage() -> list[TemplateLineage]:
    """Every template of this worker's cloud: the versions one template may retire are used only by these."""
    return await read_lineage(activity.client(), task_queue=activity.info().task_queue)


class ImageActivities(CloudActivities):
    @activity.defn
    async def retire_image_version(self, request: RetireRequest) -> None:
        """Revoke, date or delete one gallery version; each is idempotent, so a retry is harmless."""
        async with heartbeating():
            if request.action == "deleted":
                await self.cloud.delete_image_version(request.version_id)
            else:
                await self.cloud.retire_image_version(
                    request.version_id,
                    end_of_life=request.end_of_life,
                    exclude_from_latest=request.action == "revoked",
                    revoked=request.note if request.action == "revoked" else "",
                )
