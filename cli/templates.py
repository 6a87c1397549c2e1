"""Image templates, schedules and triggers as the CLI sees them: create and find a template's entity, ask it to
run, and lay out the schedule that runs it. Nothing here prints; the commands decide how to show what these return.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from cli.builds import UsageError, check_name
from workflows.golden_models import (
    ScheduledRunRequest,
    StartCondition,
    TemplateRevision,
    TemplateState,
    Webhook,
    entity_id,
)
from workflows.image_template import ImageTemplateWorkflow
from workflows.models import TEMPLATE_NAME
from workflows.scheduled_run import ScheduledRunWorkflow
from workflows.triggers import source_is_latest

ENTITY_TYPE = "ImageTemplate"


async def create_template(
    client: Client,
    name: str,
    template: dict,
    *,
    cloud: str,
    task_queue: str,
    webhooks: list[Webhook] | None = None,
    history_limit: int | None = None,
) -> WorkflowHandle:
    """Start the entity of a new template (autoRun Enabled starts its first build at once).

    Raises:
        UsageError: a template of that name exists (``kiln template update`` changes it).
    """
    check_name(name)
    state = TemplateState(
        name=name,
        cloud=cloud,
        revisions=[TemplateRevision(revision=1, template=template, created=datetime.now(UTC))],
        webhooks=webhooks or [],
    )
    if history_limit is not None:
        state.history_limit = history_limit
    try:
        return await client.start_workflow(
            ImageTemplateWorkflow.run,
            state,
            id=entity_id(name),
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=TypedSearchAttributes([SearchAttributePair(TEMPLATE_NAME, name)]),
            static_summary=f"image template {name} ({cloud})",
        )
    except WorkflowAlreadyStartedError:
        raise UsageError(f"template {name} already exists: change it with `kiln template update {name} FILE`") from None


async def get_template(client: Client, name: str) -> tuple[WorkflowHandle, TemplateState]:
    """The running entity of template ``name`` and what it holds.

    Raises:
        UsageError: there is no such template (or it was deleted).
    """
    handle = client.get_workflow_handle(entity_id(name))
    try:
        execution = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise UsageError(f"no template named {name}: create it with `kiln template create {name} FILE`") from None
        raise
    if execution.status is None or execution.status.name != "RUNNING":
        raise UsageError(f"no template named {name} (it was deleted)")
    return handle, await handle.query(ImageTemplateWorkflow.describe)


async def update(handle: WorkflowHandle, update: str, arg: object = None, **kwargs: object) -> object:
    """Send one update to a template's entity; a refusal becomes a UsageError with the entity's reason."""
    try:
        args = [] if arg is None else [arg]
        return await handle.execute_update(update, args=args, **kwargs)  # type: ignore[arg-type]
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        raise UsageError(getattr(cause, "message", None) or str(cause)) from None


def default_condition(template: dict) -> StartCondition:
    """``source-changed`` for a ``latest`` source, as EC2 Image Builder defaults; a pinned source always builds."""
    return "source-changed" if source_is_latest(template) else "always"


def schedule_of(
    *,
    name: str,
    template: str,
    task_queue: str,
    cron: str,
    when: StartCondition,
    timezone: str = "UTC",
    jitter: timedelta | None = None,
    catchup_window: timedelta | None = None,
) -> Schedule:
    """A schedule that runs ``template``: overlap SKIP, so a run never starts while the last one still builds."""
    from temporalio.client import ScheduleOverlapPolicy

    return Schedule(
        action=ScheduleActionStartWorkflow(
            ScheduledRunWorkflow.run,
            ScheduledRunRequest(template=template, schedule=name, when=when),
            # The server appends each run's time to this id.
            id=f"{name}-run",
            task_queue=task_queue,
            typed_search_attributes=TypedSearchAttributes([SearchAttributePair(TEMPLATE_NAME, template)]),
            static_summary=f"scheduled run of {template} ({when})",
        ),
        spec=ScheduleSpec(cron_expressions=[cron], time_zone_name=timezone, jitter=jitter),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=catchup_window or timedelta(hours=1)),
        state=ScheduleState(note=f"runs template {template} ({when})"),
    )
