"""ImageTemplateWorkflow: an AIB image template as a durable entity, one per template.

AIB stores a template once and runs it many times, and ``lastRunStatus`` belongs to the template. This
workflow is that resource: it holds the template's revisions, starts each build as a child ``ImageBuild``
workflow on its own task queue, keeps every run (with its lineage) and the last run's status, checks its
SourceImage trigger on an interval, and tells its webhooks what happened.

An idle entity waits on a condition and writes nothing to its history; a trigger adds one timer and one source
check per interval. Past ``history_limit`` events, with no build running and every message handled, it
continues as new with its whole state, so its history stays bounded and nothing it knows is lost.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.notify import deliver
    from activities.source import SourceActivities
    from workflows.golden_models import (
        SKIPPED,
        ArtifactDigest,
        Delivery,
        NotificationEvent,
        Retirement,
        RunRecord,
        RunRequest,
        SourceCheckRequest,
        SourceTrigger,
        TemplateRevision,
        TemplateState,
        TriggerRequest,
        TriggerStatus,
        UpdateTemplateRequest,
    )
    from workflows.models import CLOUD, TEMPLATE_NAME, BuildStatus, RunState
    from workflows.plan import cause_of
    from workflows.policies import (
        NOTIFY_ATTEMPT_TIMEOUT,
        NOTIFY_RETRY,
        NOTIFY_TIMEOUT,
        SOURCE_CHECK_RETRY,
        SOURCE_CHECK_TIMEOUT,
    )
    from workflows.triggers import trigger_refusal

BUILD_WORKFLOW = "ImageBuild"
EVENT_OF_STATE = {
    RunState.SUCCEEDED: "build.succeeded",
    RunState.FAILED: "build.failed",
    RunState.PARTIALLY_SUCCEEDED: "build.partiallySucceeded",
    RunState.CANCELED: "build.canceled",
}


@workflow.defn(name="ImageTemplate")
class ImageTemplateWorkflow:
    """One AIB image template: its revisions, runs, trigger and webhooks."""

    @workflow.init
    def __init__(self, state: TemplateState) -> None:
        self._state = state
        self._builds: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        # Handlers that start a build take turns, so two runs asked for at once never both pass "none running".
        self._starting = asyncio.Lock()
        # Set when the trigger changes: the wait for its next check starts over with its new interval.
        self._rearm = False

    @workflow.run
    async def run(self, state: TemplateState) -> TemplateState:
        workflow.upsert_search_attributes([TEMPLATE_NAME.value_set(state.name), CLOUD.value_set(state.cloud)])
        if not state.auto_run_done:
            state.auto_run_done = True
            auto_run = state.current.template.get("properties", {}).get("autoRun") or {}
            if auto_run.get("state") == "Enabled":
                async with self._starting:
                    await self._start_build(RunRequest(reason="autoRun"))
        while True:
            trigger = state.trigger
            interval = timedelta(seconds=trigger.interval_seconds) if trigger and trigger.enabled else None
            try:
                await workflow.wait_condition(
                    lambda: state.deleted or self._rearm or self._should_continue_as_new(), timeout=interval
                )
            except TimeoutError:
                await self._check_trigger()
                continue
            if self._rearm:
                self._rearm = False
                continue
            # Builds and deliveries in flight finish first: a new run could not wait for them.
            await workflow.wait_condition(lambda: not self._builds and not self._deliveries)
            await workflow.wait_condition(workflow.all_handlers_finished)
            if state.deleted:
                return state
            if self._should_continue_as_new():
                state.generation += 1
                workflow.continue_as_new(state)

    def _should_continue_as_new(self) -> bool:
        if self._builds or self._deliveries or self._starting.locked():
            return False
        info = workflow.info()
        return info.get_current_history_length() >= self._state.history_limit or info.is_continue_as_new_suggested()

    # -- queries, updates and signals --------------------------------------------------------------------------

    @workflow.query
    def describe(self) -> TemplateState:
        """The template, its revisions, every run and the trigger, as ``kiln template show`` prints them."""
        return self._state

    @workflow.update
    async def run_template(self, request: RunRequest) -> RunRecord:
        """Run the template (AIB's ``POST .../run``). A manual run while a build runs is refused, as AIB refuses
        it; a schedule's or trigger's run is recorded as skipped instead."""
        async with self._starting:
            running = self._state.running
            if running is not None:
                return self._skip(request, f"skipped: build {running.build} is still running")
            if request.when == "source-changed":
                changed = await self._source_changed()
                if changed is not None and not changed[0]:
                    return self._skip(request, f"skipped: source unchanged ({changed[1]})")
            return await self._start_build(request)

    @run_template.validator
    def _check_run(self, request: RunRequest) -> None:
        self._check_alive()
        running = self._state.running
        if request.reason == "manual" and running is not None:
            raise ValueError(
                f"template {self._state.name} is already running build {running.build}: cancel it first "
                f"(`kiln template cancel {self._state.name}`)"
            )

    @workflow.update
    async def cancel_run(self) -> RunRecord:
        """Cancel the running build (AIB's ``POST .../cancel``); the build cleans up as a cancelled build does."""
        running = self._state.running
        assert running is not None  # the validator refuses otherwise
        running.run_state = RunState.CANCELING.value
        await workflow.get_external_workflow_handle(running.build).cancel()
        return running

    @cancel_run.validator
    def _check_cancel(self) -> None:
        self._check_alive()
        if self._state.running is None:
            raise ValueError(f"template {self._state.name} has no running build to cancel")

    @workflow.update
    def update_template(self, request: UpdateTemplateRequest) -> TemplateRevision:
        """Record a new revision; the next run builds it (a running build goes on with the one it started with)."""
        revision = TemplateRevision(
            revision=self._state.current.revision + 1, template=request.template, created=workflow.now()
        )
        self._state.revisions.append(revision)
        if request.webhooks is not None:
            self._state.webhooks = request.webhooks
        trigger = self._state.trigger
        if trigger is not None and (refusal := trigger_refusal(request.template)):
            # The template no longer takes a trigger: say so on the trigger rather than refuse the update.
            trigger.enabled = False
            trigger.status = TriggerStatus(code="Unhealthy", message=refusal, time=workflow.now())
        return revision

    @update_template.validator
    def _check_update(self, request: UpdateTemplateRequest) -> None:
        self._check_alive()

    @workflow.update
    def delete(self) -> TemplateState:
        """Delete the template (AIB refuses while a build runs); its builds and their outputs stay."""
        self._state.deleted = True
        return self._state

    @delete.validator
    def _check_delete(self) -> None:
        self._check_alive()
        if (running := self._state.running) is not None:
            raise ValueError(
                f"template {self._state.name} cannot be deleted while build {running.build} runs: cancel it first"
            )

    @workflow.update
    async def create_trigger(self, request: TriggerRequest) -> SourceTrigger:
        """Add the template's SourceImage trigger (one per template, as AIB allows). It remembers the source
        version of now: a later version starts a build."""
        resolved = await self._resolve_source()
        trigger = SourceTrigger(
            name=request.name,
            interval_seconds=request.interval_seconds,
            failure_limit=request.failure_limit,
            status=TriggerStatus(time=workflow.now()),
            last_source_version=resolved or "",
        )
        self._state.trigger = trigger
        self._rearm = True
        return trigger

    @create_trigger.validator
    def _check_trigger_request(self, request: TriggerRequest) -> None:
        self._check_alive()
        if self._state.trigger is not None:
            raise ValueError(
                f"template {self._state.name} already has trigger {self._state.trigger.name}: "
                "AIB allows one SourceImage trigger per template"
            )
        if refusal := trigger_refusal(self._state.current.template):
            raise ValueError(refusal)

    @workflow.signal
    def record_retirement(self, retirement: Retirement) -> None:
        """An output version of this template was revoked, dated or deleted: ``kiln images`` shows it so."""
        self._state.retired[retirement.version_id] = retirement

    @workflow.update
    def delete_trigger(self) -> None:
        self._state.trigger = None
        self._rearm = True

    @delete_trigger.validator
    def _check_delete_trigger(self) -> None:
        self._check_alive()
        if self._state.trigger is None:
            raise ValueError(f"template {self._state.name} has no trigger")

    def _check_alive(self) -> None:
        if self._state.deleted:
            raise ValueError(f"template {self._state.name} is being deleted")

    # -- runs -------------------------------------------------------------------------------------------------

    def _skip(self, request: RunRequest, message: str) -> RunRecord:
        record = RunRecord(
            number=len(self._state.runs) + 1,
            reason=request.reason,
            requested_by=request.requested_by,
            revision=self._state.current.revision,
            run_state=SKIPPED,
            message=message,
            start_time=workflow.now(),
            end_time=workflow.now(),
        )
        self._state.runs.append(record)
        if request.reason == "schedule":
            self._notify("schedule.skipped", record, message=f"{request.requested_by}: {message}")
        return record

    async def _start_build(self, request: RunRequest) -> RunRecord:
        """Start the current revision as a child build named ``<template>-<n>``; its end is awaited apart."""
        state = self._state
        number = len(state.runs) + 1
        revision = state.current
        record = RunRecord(
            number=number,
            reason=request.reason,
            requested_by=request.requested_by,
            build=f"{state.name}-{number}",
            revision=revision.revision,
            start_time=workflow.now(),
        )
        handle = await workflow.start_child_workflow(
            BUILD_WORKFLOW,
            revision.template,
            id=record.build,
            task_queue=workflow.info().task_queue,
            result_type=BuildStatus,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(TEMPLATE_NAME, state.name), SearchAttributePair(CLOUD, state.cloud)]
            ),
            static_summary=f"{state.name} revision {revision.revision} ({request.reason})",
            # The entity never continues as new with a build running, so this only acts if it is terminated:
            # the build is then cancelled and cleans up, instead of being terminated with its VM.
            parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
        )
        state.runs.append(record)
        task = asyncio.create_task(self._await_build(handle, record, request))
        self._builds.add(task)
        task.add_done_callback(self._builds.discard)
        return record

    async def _await_build(self, handle: Any, record: RunRecord, request: RunRequest) -> None:
        try:
            status: BuildStatus = await handle
        except ChildWorkflowError as err:
            status = status_of_failure(err, record)
        record.run_state = status.run_state.value
        record.message = status.message
        record.end_time = status.end_time or workflow.now()
        record.source_exact_version = status.source_exact_version
        record.source_image_id = status.source_image_id
        record.log_uri = status.log_uri
        record.run_outputs = status.run_outputs
        record.artifacts = [ArtifactDigest(source_uri=a.source_uri, sha256=a.sha256) for a in status.staged_artifacts]
        self._ended(record)
        self._notify(EVENT_OF_STATE.get(status.run_state, "build.failed"), record)
        if request.notify_workflow:
            await workflow.get_external_workflow_handle(request.notify_workflow).signal("build_ended", record)

    def _ended(self, record: RunRecord) -> None:
        """What a build's end does to the trigger: AIB's auto-deactivation after repeated failures, and
        re-activation by a successful manual build."""
        trigger = self._state.trigger
        if trigger is None:
            return
        succeeded = record.run_state in (RunState.SUCCEEDED, RunState.PARTIALLY_SUCCEEDED)
        if succeeded:
            trigger.last_source_version = record.source_exact_version or trigger.last_source_version
        if record.reason == "trigger":
            trigger.consecutive_failures = 0 if succeeded else trigger.consecutive_failures + 1
            if trigger.consecutive_failures >= trigger.failure_limit and trigger.enabled:
                trigger.enabled = False
                trigger.status = TriggerStatus(
                    code="Unhealthy",
                    message=f"Trigger was deactivated after {trigger.consecutive_failures} consecutive failed "
                    "builds; a successful manual build activates it again.",
                    time=workflow.now(),
                )
                self._notify("trigger.disabled", record, message=trigger.status.message)
        elif (
            record.reason == "manual"
            and succeeded
            and not trigger.enabled
            and trigger_refusal(self._state.current.template) is None
        ):
            trigger.enabled, trigger.consecutive_failures = True, 0
            trigger.status = TriggerStatus(time=workflow.now())
            self._rearm = True

    async def _check_trigger(self) -> None:
        """One interval's look at the source: a version the trigger has not seen starts a build."""
        trigger = self._state.trigger
        if trigger is None or not trigger.enabled or self._state.running is not None:
            return
        async with self._starting:
            try:
                version = await self._resolve_source(raise_errors=True)
            except ActivityError as err:
                trigger.status = TriggerStatus(
                    code="Unhealthy", message=f"The source could not be checked: {cause_of(err)}", time=workflow.now()
                )
                return
            if trigger.status.code == "Unhealthy":
                trigger.status = TriggerStatus(time=workflow.now())
            if not version or version == trigger.last_source_version:
                return
            record = await self._start_build(RunRequest(reason="trigger", requested_by=trigger.name))
        self._notify("trigger.fired", record, message=f"source version {version} appeared", version=version)

    async def _resolve_source(self, *, raise_errors: bool = False) -> str | None:
        """The exact version the template's source resolves to now (None if it could not be resolved)."""
        try:
            resolved = await workflow.execute_activity_method(
                SourceActivities.check_source,
                SourceCheckRequest(name=self._state.name, template=self._state.current.template),
                start_to_close_timeout=SOURCE_CHECK_TIMEOUT,
                retry_policy=SOURCE_CHECK_RETRY,
                summary="check source",
            )
        except ActivityError:
            if raise_errors:
                raise
            return None
        return resolved.exact_version

    async def _source_changed(self) -> tuple[bool, str] | None:
        """Whether the source (or the template) changed since the last successful build, and the version now."""
        last = self._state.last_success()
        version = await self._resolve_source()
        if version is None:
            return None  # a build reports why the source cannot be resolved better than a skip would
        if last is None or last.revision != self._state.current.revision:
            return True, version
        return version != last.source_exact_version, version

    # -- notifications ----------------------------------------------------------------------------------------

    def _notify(self, kind: str, record: RunRecord, *, message: str = "", version: str = "") -> None:
        """Tell every webhook, in the background: a delivery never holds up or fails a build."""
        if not self._state.webhooks:
            return
        self._state.events_sent += 1
        event = NotificationEvent(
            id=f"{workflow.info().workflow_id}/{self._state.events_sent}",
            kind=kind,  # type: ignore[arg-type]
            template=self._state.name,
            time=workflow.now(),
            build=record.build,
            run_state=record.run_state,
            message=message or record.message,
            outputs=record.run_outputs,
            log_uri=record.log_uri,
            source_exact_version=version or record.source_exact_version,
        )
        for webhook in self._state.webhooks:
            task = asyncio.create_task(self._deliver(Delivery(event=event, webhook=webhook)))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            await workflow.execute_activity(
                deliver,
                delivery,
                schedule_to_close_timeout=NOTIFY_TIMEOUT,
                start_to_close_timeout=NOTIFY_ATTEMPT_TIMEOUT,
                retry_policy=NOTIFY_RETRY,
                summary=f"notify {delivery.event.kind}",
            )
        except ActivityError as err:
            workflow.logger.warning("webhook %s gave up on %s: %s", delivery.webhook.url, delivery.event.id, err)


def status_of_failure(err: ChildWorkflowError, record: RunRecord) -> BuildStatus:
    """A failed or cancelled build's final status: its BuildFailed error carries it; a cancel or terminate not."""
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.details:
        return BuildStatus.model_validate(cause.details[0])
    state = RunState.CANCELED if is_cancelled_exception(err) else RunState.FAILED
    return BuildStatus(template_name=record.build, run_state=state, message=cause_of(err))
