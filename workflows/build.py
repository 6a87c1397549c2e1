"""ImageBuildWorkflow: one AIB image build as a saga.

Each create registers its undo *before* it runs (a create that dies half-way still gets cleaned up), and the
undo stack always runs at the end: on success, failure, cancel and timeout alike. Only three things survive a
build: its logs, its finished distribution outputs, and (with errorHandling ``abort``) the VM kept for debugging.

The build runs as a task beside a timer for buildTimeoutInMinutes, not under a workflow timeout: a workflow
timeout would end the run without running any of this code, and leave the VM behind.

This module orders the steps; beside it, ``plan`` says what each step is given, ``undo`` keeps the undo stack,
``deadline`` the movable deadline, ``messages`` words the status, and ``policies`` times and retries it all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.build_vm import BuildVmActivities
    from activities.capture import CaptureActivities
    from activities.clouds.registry import cloud_of
    from activities.customize import CustomizeActivities
    from activities.distribute import DistributeActivities
    from activities.generalize import GeneralizeActivities
    from activities.source import SourceActivities
    from activities.staging import StagingActivities
    from activities.template import validate_template
    from workflows import messages
    from workflows.deadline import Deadline
    from workflows.metrics import BuildMetrics
    from workflows.models import (
        BUILD_ID,
        CLEANUP_LEFT,
        CLOUD,
        RUN_STATE,
        SOURCE_IMAGE,
        TEMPLATE_NAME,
        BuildContext,
        BuildStatus,
        BuildVm,
        CapturedImage,
        CaptureRequest,
        CaptureSpec,
        CreateVmRequest,
        DeadlineRequest,
        DeleteOutputRequest,
        DeleteRequest,
        DistributeRequest,
        GuestScriptRequest,
        ResolvedSource,
        ResolveSourceRequest,
        Resource,
        RunOutput,
        RunState,
        RunSubState,
        StageArtifactsRequest,
        StagedArtifact,
        Staging,
        StepRecord,
        VmSpec,
    )
    from workflows.plan import (
        artifacts_of,
        build_id_of,
        cause_of,
        context_of,
        guest_request,
        index_by_field,
        source_label,
        workload_of,
        workload_request,
    )
    from workflows.policies import (
        BUILD_UNDO,
        CAPTURE_TIMEOUT,
        DEPROVISION_TIMEOUT,
        STEP_HEARTBEAT,
        STEP_RETRY,
        STEP_TIMEOUT,
        VALIDATE_RETRY,
        VALIDATE_TIMEOUT,
        WAIT_FOR_CANCEL,
    )
    from workflows.recorded import rebuild
    from workflows.template import (
        ImageTemplate,
        TemplateError,
        parse_template,
    )
    from workflows.undo import DELETE_IMAGE, DELETE_OUTPUT, DELETE_STAGING, DELETE_VM, UndoStack

T = TypeVar("T")

# Builds from here on validate their template in a local activity; those started before replay as they ran.
VALIDATION_RECORDED = "template-validation-recorded"


class BuildAborted(Exception):
    """A customizer or validator failed and errorHandling says abort: keep the VM for debugging."""


@workflow.defn(name="ImageBuild")
class ImageBuildWorkflow:
    """One build of one AIB template, on the cloud of the task queue it was started on."""

    def __init__(self) -> None:
        self._status = BuildStatus()
        self._metrics = BuildMetrics()
        self._undos = UndoStack(self._status, policy=BUILD_UNDO, metrics=self._metrics)
        self._deadline: Deadline | None = None
        self._abort_keeps: set[str] = set()
        self._finished_outputs: set[str] = set()
        self._validation_failed = False
        # Set once the build is cancelled or times out: an activity that finishes anyway must not lead to
        # another step (a cancel reaches a running activity only at its next heartbeat).
        self._stopping = False

    @workflow.query
    def status(self) -> BuildStatus:
        """AIB's lastRunStatus and runOutputs, each step, and what is still alive or left to undo."""
        return self._status

    @workflow.update
    def set_deadline(self, request: DeadlineRequest) -> BuildStatus:
        """Move the build's deadline to ``seconds`` from now: give a slow build more time without restarting it,
        or less. Reaching it fails the build and cleans up, exactly as buildTimeoutInMinutes does."""
        assert self._deadline is not None  # the validator refuses the update until there is one
        self._deadline.move(workflow.now() + timedelta(seconds=request.seconds))
        self._status.deadline = self._deadline.at
        return self._status

    @set_deadline.validator
    def _check_deadline(self, request: DeadlineRequest) -> None:
        if self._status.run_state != RunState.RUNNING or self._deadline is None:
            raise ValueError(f"the build is {self._status.run_state}; its deadline can no longer move")
        if request.seconds < 0:
            raise ValueError("seconds must be zero or more")

    @workflow.run
    async def run(self, template: dict[str, Any]) -> BuildStatus:
        info = workflow.info()
        self._status.start_time = workflow.now()
        self._status.template_name = info.workflow_id
        self._status.build_id = build_id_of(info.workflow_id, info.run_id)
        self._status.cloud = cloud_of(info.task_queue)
        self._metrics.entered(RunState.RUNNING, self._status.cloud)
        parsed = await self._validated(template)
        workflow.upsert_search_attributes(
            [
                # A client may name the template apart from the build (kiln build --name); keep its name then.
                TEMPLATE_NAME.value_set(info.typed_search_attributes.get(TEMPLATE_NAME) or self._status.template_name),
                CLOUD.value_set(self._status.cloud),
                SOURCE_IMAGE.value_set(source_label(parsed)),
                RUN_STATE.value_set(RunState.RUNNING.value),
                BUILD_ID.value_set(self._status.build_id),
            ]
        )

        build = asyncio.create_task(self._build(parsed))
        timeout = parsed.properties.build_timeout
        deadline = self._deadline = Deadline(self._status.start_time + timeout)
        self._status.deadline = deadline.at
        ended_by = await self._wait_for(build, deadline)
        # 👉 Let the build task settle first: with WAIT_CANCELLATION_COMPLETED its running activity has
        # stopped before any undo runs, so a cleanup never races a half-made VM.
        await settle(build)
        failure = build.exception() if not build.cancelled() else asyncio.CancelledError()
        if failure is not None and not isinstance(failure, FailureError | BuildAborted | asyncio.CancelledError):
            raise failure  # a bug in this code: fail the workflow task so a fixed worker can replay it

        keep_outputs = failure is None and ended_by is None
        await settle(
            asyncio.create_task(self._cleanup(aborted=isinstance(failure, BuildAborted), keep_outputs=keep_outputs))
        )

        if ended_by == "cancel":
            self._finish(RunState.CANCELED, messages.canceled(self._status))
            raise asyncio.CancelledError()
        if ended_by == "timeout":
            self._finish(RunState.FAILED, messages.timed_out(self._status, timeout=timeout, moved=deadline.moved))
            raise ApplicationError(self._status.message, self._status, type="BuildTimedOut", non_retryable=True)
        if failure is not None:
            if isinstance(failure, BuildAborted):
                self._finish(RunState.FAILED, messages.aborted(self._status, str(failure)))
            else:
                self._finish(RunState.FAILED, messages.failed(self._status, failure))
            raise ApplicationError(self._status.message, self._status, type="BuildFailed", non_retryable=True)

        state, message = messages.outcome(self._status, validation_failed=self._validation_failed)
        self._finish(state, message)
        if self._status.run_state == RunState.FAILED:
            raise ApplicationError(self._status.message, self._status, type="BuildFailed", non_retryable=True)
        return self._status

    async def _validated(self, template: dict[str, Any]) -> ImageTemplate:
        """The template as validated; the verdict is recorded in history, so a rule added later never changes
        how this build replays.

        Raises:
            ApplicationError: InvalidTemplate, non-retryable, once the status says Failed and lists every issue.
            asyncio.CancelledError: the build was cancelled while its template was validated.
        """
        try:
            if not workflow.patched(VALIDATION_RECORDED):
                return parse_template(template)
            accepted = await workflow.execute_local_activity(
                validate_template,
                template,
                start_to_close_timeout=VALIDATE_TIMEOUT,
                retry_policy=VALIDATE_RETRY,
                summary="validate template",
            )
            self._status.warnings = accepted.warnings
            # Not decoded through the model: that would judge the template again, by today's rules, on replay.
            return rebuild(ImageTemplate, accepted.template)
        # A local activity's failure comes as its own error (ApplicationError), not wrapped in an ActivityError.
        except (TemplateError, FailureError, asyncio.CancelledError) as err:
            if is_cancelled_exception(err):
                self._finish(RunState.CANCELED, messages.canceled(self._status))
                raise asyncio.CancelledError() from None
            # The activity retries all else, so what ends it is InvalidTemplate (non-retryable), or TemplateError.
            self._finish(RunState.FAILED, messages.invalid_template(cause_of(err)))
            raise ApplicationError(self._status.message, type="InvalidTemplate", non_retryable=True) from None

    async def _wait_for(self, build: asyncio.Task[None], deadline: Deadline) -> str | None:
        """Wait for the build task, its deadline or a cancel request; say which ended it (None: it finished)."""
        try:
            if not await deadline.wait(build.done):
                return None
            ended_by = "timeout"
        except asyncio.CancelledError:  # a client asked to cancel; CancelledError is not an Exception
            self._set_state(RunState.CANCELING)
            ended_by = "cancel"
        self._stopping = True
        build.cancel()
        return ended_by

    async def _build(self, template: ImageTemplate) -> None:
        props = template.properties
        context = context_of(
            template,
            build_id=self._status.build_id,
            template_name=self._status.template_name,
            cloud=self._status.cloud,
        )

        source = await self._step(
            "resolve source",
            SourceActivities.resolve_source,
            ResolveSourceRequest(build=context, template=template),
        )
        self._status.source_exact_version = source.exact_version
        self._status.source_image_id = source.image_id

        self._undos.push(
            DELETE_STAGING, DeleteRequest(build=context, name="staging"), owner="staging", label="delete staging"
        )
        staging = await self._step("create staging", StagingActivities.create_staging, context)
        self._status.exact_staging_resource_group = staging.resource_group_id
        self._status.log_uri = f"{staging.log_uri_prefix}customization.log"
        self._track("staging", staging.resources)

        artifacts = artifacts_of(template)
        staged: list[StagedArtifact] = []
        if artifacts:
            staged = await self._step(
                "stage artifacts",
                StagingActivities.stage_artifacts,
                StageArtifactsRequest(build=context, staging=staging, artifacts=artifacts),
            )
        self._status.staged_artifacts = staged
        staged_by_field = index_by_field(artifacts, staged)

        validation = props.validation
        if validation is not None and validation.source_validation_only:
            await self._validate(context, staging, source, source.image_id, template, staged_by_field)
            return

        self._set_sub_state(RunSubState.BUILDING)
        vm = await self._create_vm(context, staging, source, source.image_id, template, "build")

        self._set_sub_state(RunSubState.CUSTOMIZING)
        for index in range(len(props.customize)):
            request = guest_request(
                context,
                staging,
                vm,
                verb="customize",
                path="properties.customize",
                steps=props.customize,
                index=index,
                staged_by_field=staged_by_field,
            )
            try:
                await self._step(
                    request.label, CustomizeActivities.run_customizer, request, timeout=props.build_timeout
                )
            except ActivityError as err:
                if props.error_handling.on_customizer_error == "abort" and not is_cancelled_exception(err):
                    self._abort_keeps = {vm.name}
                    raise BuildAborted(request.label) from None
                raise

        await self._step(
            "deprovision",
            GeneralizeActivities.generalize,
            GuestScriptRequest(build=context, staging=staging, vm=vm, index=len(props.customize), label="deprovision"),
            timeout=DEPROVISION_TIMEOUT,
        )

        self._set_sub_state(RunSubState.OPTIMIZING)
        image_name = f"{context.build_id}-image"
        self._undos.push(
            DELETE_IMAGE, DeleteRequest(build=context, name=image_name), owner=image_name, label="delete captured image"
        )
        image = await self._step(
            "capture image",
            CaptureActivities.capture_image,
            CaptureRequest(
                build=context,
                staging=staging,
                vm=vm,
                spec=CaptureSpec(name=image_name, os_disk_size_gb=props.vm_profile.os_disk_size_gb),
            ),
            timeout=CAPTURE_TIMEOUT,
        )
        self._track(image_name, image.resources)
        # The build VM is done with: free it now rather than at the end of distribution.
        await self._undo_now(vm.name)

        # optimize: as AIB does, while Optimizing the image is booted once (vmBoot), so its first boot is done before
        # it is published, and the workload script runs on it; on a cloud that boot-checks its images, that boot
        # check is vmBoot's boot.
        workload = workload_of(template, source)
        vm_boot = props.optimize is not None and props.optimize.vm_boot_enabled and not image.boot_check
        if workload is not None or vm_boot:
            booted = await self._create_vm(context, staging, source, image.id, template, "optimization")
            if workload is not None:
                request = workload_request(
                    context, staging, booted, template=template, step=workload, staged_by_field=staged_by_field
                )
                await self._step(
                    request.label, CustomizeActivities.run_customizer, request, timeout=props.build_timeout
                )
            await self._undo_now(booted.name)

        # A cloud that boot-checks its images boots this one even with no validator to run in it.
        if (validation is not None and validation.in_vm_validations) or image.boot_check:
            await self._validate(context, staging, source, image.id, template, staged_by_field)
            if self._validation_failed and not (validation and validation.continue_distribute_on_failure):
                return

        await self._distribute(context, staging, image, source, template)

    async def _create_vm(
        self,
        context: BuildContext,
        staging: Staging,
        source: ResolvedSource,
        image_id: str,
        template: ImageTemplate,
        purpose: str,
    ) -> BuildVm:
        name = f"{context.build_id}-{purpose}"
        self._undos.push(DELETE_VM, DeleteRequest(build=context, name=name), owner=name, label=f"delete {purpose} VM")
        vm = await self._step(
            f"create {purpose} VM",
            BuildVmActivities.create_vm,
            CreateVmRequest(
                build=context,
                staging=staging,
                spec=VmSpec(
                    name=name,
                    purpose=purpose,
                    image_id=image_id,
                    source=source,
                    vm_profile=template.properties.vm_profile,
                    # The image carries the data disks to the VMs made from it; only the build VM gets empty ones.
                    data_disk_sizes_gb=[d.size_gb or 0 for d in template.properties.additional_data_disks]
                    if purpose == "build"
                    else [],
                    security_type=source.build_security_type if purpose == "build" else "Standard",
                ),
            ),
        )
        self._track(name, vm.resources)
        return vm

    async def _validate(
        self,
        context: BuildContext,
        staging: Staging,
        source: ResolvedSource,
        image_id: str,
        template: ImageTemplate,
        staged_by_field: dict[str, StagedArtifact],
    ) -> None:
        """Run inVMValidations on a VM made from the image (or from the source, with sourceValidationOnly); with
        none to run, the VM's boot is the whole check."""
        validation = template.properties.validation
        validators = validation.in_vm_validations if validation is not None else []
        self._set_sub_state(RunSubState.VALIDATING)
        vm = await self._create_vm(context, staging, source, image_id, template, "validation")
        for index in range(len(validators)):
            request = guest_request(
                context,
                staging,
                vm,
                verb="validate",
                path="properties.validate.inVMValidations",
                steps=validators,
                index=index,
                staged_by_field=staged_by_field,
            )
            label = request.label
            try:
                await self._step(
                    label, CustomizeActivities.run_customizer, request, timeout=template.properties.build_timeout
                )
            except ActivityError as err:
                if is_cancelled_exception(err):
                    raise
                if template.properties.error_handling.on_validation_error == "abort":
                    self._abort_keeps = {vm.name}
                    raise BuildAborted(label) from None
                if not (validation and validation.continue_distribute_on_failure):
                    raise
                self._validation_failed = True
                self._status.message = messages.step_failed(label, cause_of(err))
                break
        await self._undo_now(vm.name)

    async def _distribute(
        self,
        context: BuildContext,
        staging: Staging,
        image: CapturedImage,
        source: ResolvedSource,
        template: ImageTemplate,
    ) -> None:
        self._set_sub_state(RunSubState.DISTRIBUTING)

        async def one(index: int) -> None:
            target = template.properties.distribute[index]
            owner = f"output-{index}"
            self._undos.push(
                DELETE_OUTPUT,
                DeleteOutputRequest(build=context, target=target, index=index),
                owner=owner,
                label=f"delete unfinished {target.run_output_name}",
            )
            try:
                output = await self._step(
                    f"distribute {target.type} {target.run_output_name}",
                    DistributeActivities.distribute,
                    DistributeRequest(
                        build=context, staging=staging, image=image, source=source, target=target, index=index
                    ),
                    timeout=template.properties.build_timeout,
                )
            except ActivityError as err:
                if is_cancelled_exception(err):
                    raise
                output = RunOutput(
                    run_output_name=target.run_output_name,
                    type=target.type,
                    provisioning_state="Failed",
                    message=cause_of(err),
                )
            self._status.run_outputs.append(output)
            if output.provisioning_state == "Succeeded":
                self._finished_outputs.add(owner)

        await asyncio.gather(*(one(i) for i in range(len(template.properties.distribute))))

    async def _step(
        self,
        name: str,
        activity: Callable[..., Awaitable[T]],
        request: Any,
        *,
        timeout: timedelta = STEP_TIMEOUT,
    ) -> T:
        """Run one build step as an activity and record its start, end and outcome in the status."""
        if self._stopping:
            raise asyncio.CancelledError()
        record = StepRecord(name=name, started=workflow.now())
        self._status.steps.append(record)
        workflow.set_current_details(f"**{self._status.run_sub_state}**: {name}")
        try:
            result = await workflow.execute_activity_method(
                activity,
                request,
                start_to_close_timeout=timeout,
                heartbeat_timeout=STEP_HEARTBEAT,
                retry_policy=STEP_RETRY,
                cancellation_type=WAIT_FOR_CANCEL,
                summary=name,
            )
        # Not BaseException: a workflow evicted from a worker's cache unwinds with GeneratorExit, outside the
        # workflow's event loop, where workflow.now() cannot be asked.
        except (Exception, asyncio.CancelledError) as err:
            record.outcome = "canceled" if is_cancelled_exception(err) else "failed"
            record.message = "" if record.outcome == "canceled" else cause_of(err)
            record.ended = workflow.now()
            self._metrics.step(name, record.outcome, record.ended - record.started, self._status.cloud)
            raise
        record.outcome, record.ended = "succeeded", workflow.now()
        self._metrics.step(name, record.outcome, record.ended - record.started, self._status.cloud)
        return result

    def _track(self, owner: str, resources: list[Resource]) -> None:
        self._status.resources += [r.model_copy(update={"owner": owner}) for r in resources]
        self._metrics.created((r.kind for r in resources), self._status.cloud)

    async def _undo_now(self, owner: str) -> None:
        """Run one undo early (the build VM once it is captured), and take it off the stack."""
        if self._stopping:
            raise asyncio.CancelledError()
        await self._undos.run_early(owner)

    async def _cleanup(self, *, aborted: bool, keep_outputs: bool) -> None:
        """Run the undo stack, newest first. Finished outputs are kept only when the build ran to its end: a
        cancelled or timed-out build publishes nothing."""
        if aborted:
            # The staging group holds the VM (on Azure, deleting the group deletes the VM), so abort keeps both.
            for undo in self._undos.keep(self._abort_keeps | {"staging"}):
                self._status.kept_on_abort += [r for r in self._status.resources if r.owner == undo.owner]
        if keep_outputs:
            self._undos.keep(self._finished_outputs)
        await self._undos.run_all()

    def _set_sub_state(self, sub_state: RunSubState) -> None:
        self._status.run_sub_state = sub_state

    def _set_state(self, state: RunState) -> None:
        self._status.run_state = state
        self._metrics.entered(state, self._status.cloud)
        workflow.upsert_search_attributes([RUN_STATE.value_set(state.value)])

    def _finish(self, state: RunState, message: str) -> None:
        """End the status as ``state``; the message ends with what the cleanup left, if it left anything."""
        self._set_state(state)
        left = self._undos.left()
        if left:
            workflow.upsert_search_attributes([CLEANUP_LEFT.value_set("; ".join(left))])
        self._status.message = messages.with_cleanup_notes(message, left)
        self._metrics.left(len(left), self._status.cloud)
        self._status.end_time = workflow.now()
        workflow.set_current_details(f"**{state}** {self._status.message}")


async def settle(task: asyncio.Task[Any]) -> None:
    """Wait for ``task`` to end, even if a cancel request reaches this workflow meanwhile.

    Temporal delivers a cancel request once, as a CancelledError in the main task. One that comes while the
    build is already ending (timed out, failed, cleaning up) must not cut the cleanup short, so it is let go.
    """
    while not task.done():
        try:
            await asyncio.shield(task)
        except GeneratorExit:
            raise  # the workflow is being evicted from the worker's cache: unwind, it replays elsewhere
        except BaseException:
            pass  # the task's own outcome is read by the caller
