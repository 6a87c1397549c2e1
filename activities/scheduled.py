"""A schedule's run asks its template to build: an update to the template's entity, sent from an activity
(workflows can signal other workflows, but only a client can send one an update and read its answer)."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.clouds.base import PermanentError
from workflows.golden_models import RunRecord, RunRequest, ScheduledRunRequest, entity_id


@activity.defn
async def request_run(request: ScheduledRunRequest) -> RunRecord:
    """Ask template ``request.template`` for a run; its answer says whether it started a build or skipped.

    Raises:
        PermanentError: TemplateRefused, the template refused the run (it is being deleted, or is gone).
    """
    handle = activity.client().get_workflow_handle(entity_id(request.template))
    try:
        return await handle.execute_update(
            "run_template",
            RunRequest(
                reason="schedule",
                requested_by=request.schedule,
                when=request.when,
                notify_workflow=activity.info().workflow_id,
            ),
            result_type=RunRecord,
        )
    except WorkflowUpdateFailedError as err:
        raise PermanentError(f"template {request.template}: {err.cause}", kind="TemplateRefused") from None
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise PermanentError(f"there is no template {request.template}", kind="TemplateRefused") from None
        raise
