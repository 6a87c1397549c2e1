"""ImageBuildWorkflow: one AIB image build as a saga.

Each create registers its undo *before* it runs (a create that dies half-way still gets cleaned up), and the
undo stack always runs at the end: on success, failure, cancel and timeout alike. Only three things survive a
build: its logs, its finished distribution outputs, and (with errorHandling ``abort``) the VM kept for debugging.

The build runs as a task beside a timer for buildTimeoutInMinutes, not under a workflow timeout: a workflow
timeout would end the run without running any of this code, and leave the VM behind.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.build_vm import BuildVmActivities
    from activities.capture import CaptureActivities
    from activities.customize import CustomizeActivities
    from activities.distribute import DistributeActivities
    from activities.generalize import GeneralizeActivities
    from activities.source import SourceActivities
    from activities.staging import StagingActivities
    from activities.template import validate_template
    from workflows.camel import CamelModel
    from workflows.models import (
        BUILD_ID,
        CLOUD,
        RUN_STATE,
        SOURCE_IMAGE,
        TASK_QUEUES,
        TEMPLATE_NAME,
        Artifact,
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
        PendingUndo,
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
    from workflows.recorded import rebuild
    from workflows.template import (
        FileCustomizer,
        ImageTemplate,
        PowerShellCustomizer,
        ShellCustomizer,
        TemplateError,
        TemplateIssue,
        destination_resource_group,
        parse_template,
    )

T = TypeVar("T")

WINDOWS_ONLY_STEPS = ("PowerShell", "WindowsRestart", "WindowsUpdate")

WAIT = workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
HEARTBEAT = timedelta(seconds=15)
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1), maximum_attempts=8
)
# Cleanup never gives up on a transient error: a leaked VM costs more than a slow cleanup.
CLEANUP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1))
CLEANUP = "cleanup"
# Parsing a template is milliseconds of CPU: half a minute means a stuck worker, and the retry goes to another.
VALIDATE_TIMEOUT = timedelta(seconds=30)
# A bad template fails at once (non-retryable); anything else is a bug, retried until a fixed worker takes over.
VALIDATE_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1))
# Builds from here on validate their template in a local activity; those started before replay as they ran.
VALIDATION_RECORDED = "template-validation-recorded"


class BuildAborted(Exception):
    """A customizer or validator failed and errorHandling says abort: keep the VM for debugging."""


@workflow.defn(name="ImageBuild")
class ImageBuildWorkflow:
    def __init__(self) -> None:
        self._status = BuildStatus()
        self._abort_keeps: set[str] = set()
        self._finished_outputs: set[str] = set()
        self._deadline_moved = False
        self._deadline_changed = False
        self._validation_failed = False
        # Set once the build is cancelled or times out: an activity that finishes anyway must not lead to
        # another step (a cancel reaches a running activity only at its next heartbeat).
        self._stopping = False

    @workflow.query
    def status(self) -> BuildStatus:
        return self._status

    @workflow.update
    def set_deadline(self, request: DeadlineRequest) -> BuildStatus:
        """Move the build's deadline to ``seconds`` from now: give a slow build more time without restarting it,
        or less. Reaching it fails the build and cleans up, exactly as buildTimeoutInMinutes does."""
        self._status.deadline = workflow.now() + timedelta(seconds=request.seconds)
        self._deadline_moved = True
        self._deadline_changed = True
        return self._status

    @set_deadline.validator
    def _check_deadline(self, request: DeadlineRequest) -> None:
        if self._status.run_state != RunState.RUNNING or self._status.deadline is None:
            raise ValueError(f"the build is {self._status.run_state}; its deadline can no longer move")
        if request.seconds < 0:
            raise ValueError("seconds must be zero or more")

    async def _wait_for(self, build: asyncio.Task[None]) -> str | None:
        """Wait for the build task, its deadline or a cancel request; say which ended it (None: it finished)."""
        while not build.done():
            assert self._status.deadline is not None
            self._deadline_changed = False
            remaining = max(self._status.deadline - workflow.now(), timedelta(milliseconds=1))
            try:
                await workflow.wait_condition(lambda: build.done() or self._deadline_changed, timeout=remaining)
            except TimeoutError:
                self._stopping = True
                build.cancel()
                return "timeout"
            except asyncio.CancelledError:  # a client asked to cancel; CancelledError is not an Exception
                self._set_state(RunState.CANCELING)
                self._stopping = True
                build.cancel()
                return "cancel"
        return None

    @workflow.run
    async def run(self, template: dict[str, Any]) -> BuildStatus:
        info = workflow.info()
        self._status.start_time = workflow.now()
        self._status.template_name = info.workflow_id
        self._status.build_id = build_id_of(info.workflow_id, info.run_id)
        self._status.cloud = next((c for c, q in TASK_QUEUES.items() if q == info.task_queue), info.task_queue)
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
        self._status.deadline = self._status.start_time + timeout
        ended_by = await self._wait_for(build)
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
            self._finish(RunState.CANCELED, self._with_cleanup_notes(f"Canceled during {self._last_step()}."))
            raise asyncio.CancelledError()
        if ended_by == "timeout":
            minutes = int(timeout.total_seconds() // 60)
            moved = ", moved by a set_deadline update" if self._deadline_moved else ""
            self._finish(
                RunState.FAILED,
                self._with_cleanup_notes(
                    f"The build timed out during {self._last_step()}: it reached its deadline "
                    f"(buildTimeoutInMinutes {minutes}{moved})."
                ),
            )
            raise ApplicationError(self._status.message, self._status, type="BuildTimedOut", non_retryable=True)
        if failure is not None:
            self._finish(RunState.FAILED, self._with_cleanup_notes(self._failure_message(failure)))
            raise ApplicationError(self._status.message, self._status, type="BuildFailed", non_retryable=True)

        state, message = self._outcome()
        self._finish(state, self._with_cleanup_notes(message))
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
            # Not decoded through the model: that would judge the template again, by today's rules, on replay.
            return rebuild(ImageTemplate, accepted)
        # A local activity's failure comes as its own error (ApplicationError), not wrapped in an ActivityError.
        except (TemplateError, FailureError, asyncio.CancelledError) as err:
            if is_cancelled_exception(err):
                self._finish(RunState.CANCELED, self._with_cleanup_notes(f"Canceled during {self._last_step()}."))
                raise asyncio.CancelledError() from None
            # The activity retries all else, so what ends it is InvalidTemplate (non-retryable), or TemplateError.
            self._finish(RunState.FAILED, f"The template is not valid:\n{cause_of(err)}")
            raise ApplicationError(self._status.message, type="InvalidTemplate", non_retryable=True) from None

    async def _build(self, template: ImageTemplate) -> None:
        props = template.properties
        context = BuildContext(
            build_id=self._status.build_id,
            template_name=self._status.template_name,
            location=template.location,
            cloud=self._status.cloud,
            tags=template.tags,
            managed_resource_tags=props.managed_resource_tags,
            staging_resource_group=props.staging_resource_group,
            destination_resource_group=destination_resource_group(template),
        )

        source = await self._step(
            "resolve source",
            SourceActivities.resolve_source,
            ResolveSourceRequest(build=context, template=template),
            timeout=timedelta(minutes=30),
        )
        self._status.source_exact_version = source.exact_version
        if issues := guest_issues(template, source):
            raise ApplicationError(
                "The template cannot be built on this source:\n" + "\n".join(f"{i.path}: {i.message}" for i in issues),
                type="InvalidTemplate",
                non_retryable=True,
            )

        self._push_undo("staging", "delete staging", "delete_staging", DeleteRequest(build=context, name="staging"))
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
        staged_by_field = {artifact.field: s for artifact, s in zip(artifacts, staged, strict=True)}

        validation = props.validation
        if validation is not None and validation.source_validation_only:
            await self._validate(context, staging, source, source.image_id, template, staged_by_field)
            return

        self._set_sub_state(RunSubState.BUILDING)
        vm = await self._create_vm(context, staging, source, source.image_id, template, "build")

        self._set_sub_state(RunSubState.CUSTOMIZING)
        for index in range(len(props.customize)):
            request = guest_request(
                context, staging, vm, "customize", "properties.customize", props.customize, index, staged_by_field
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
            timeout=timedelta(hours=1),
        )

        self._set_sub_state(RunSubState.OPTIMIZING)
        image_name = f"{context.build_id}-image"
        self._push_undo(
            image_name, "delete captured image", "delete_image", DeleteRequest(build=context, name=image_name)
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
            timeout=timedelta(hours=2),
        )
        self._track(image_name, image.resources)
        # The build VM is done with: free it now rather than at the end of distribution.
        await self._undo_now(vm.name)

        if validation is not None and validation.in_vm_validations:
            await self._validate(context, staging, source, image.id, template, staged_by_field)
            if self._validation_failed and not validation.continue_distribute_on_failure:
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
        self._push_undo(name, f"delete {purpose} VM", "delete_vm", DeleteRequest(build=context, name=name))
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
        """Run inVMValidations on a VM made from the image (or from the source, with sourceValidationOnly)."""
        validation = template.properties.validation
        assert validation is not None
        self._set_sub_state(RunSubState.VALIDATING)
        vm = await self._create_vm(context, staging, source, image_id, template, "validation")
        for index in range(len(validation.in_vm_validations)):
            request = guest_request(
                context,
                staging,
                vm,
                "validate",
                "properties.validate.inVMValidations",
                validation.in_vm_validations,
                index,
                staged_by_field,
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
                if not validation.continue_distribute_on_failure:
                    raise
                self._validation_failed = True
                self._status.message = f"{label} failed: {cause_of(err)}"
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
            self._push_undo(
                owner,
                f"delete unfinished {target.run_output_name}",
                "delete_output",
                DeleteOutputRequest(build=context, target=target, index=index),
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
        timeout: timedelta = timedelta(minutes=30),
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
                heartbeat_timeout=HEARTBEAT,
                retry_policy=STEP_RETRY,
                cancellation_type=WAIT,
                summary=name,
            )
        # Not BaseException: a workflow evicted from a worker's cache unwinds with GeneratorExit, outside the
        # workflow's event loop, where workflow.now() cannot be asked.
        except (Exception, asyncio.CancelledError) as err:
            record.outcome = "canceled" if is_cancelled_exception(err) else "failed"
            record.message = "" if record.outcome == "canceled" else cause_of(err)
            record.ended = workflow.now()
            raise
        record.outcome, record.ended = "succeeded", workflow.now()
        return result

    def _push_undo(self, owner: str, label: str, activity: str, request: CamelModel) -> None:
        """Register an undo before the create it undoes: a create that dies half-way still gets cleaned up."""
        self._status.pending_cleanup.append(
            PendingUndo(owner=owner, label=label, activity=activity, request=request.model_dump(mode="json"))
        )

    def _track(self, owner: str, resources: list[Resource]) -> None:
        self._status.resources += [r.model_copy(update={"owner": owner}) for r in resources]

    async def _undo_now(self, owner: str) -> None:
        """Run one undo early (the build VM once it is captured), and take it off the stack."""
        if self._stopping:
            raise asyncio.CancelledError()
        undo = next(u for u in self._status.pending_cleanup if u.owner == owner)
        if await self._run_undo(undo):
            self._status.pending_cleanup.remove(undo)

    async def _cleanup(self, *, aborted: bool, keep_outputs: bool) -> None:
        """Run the undo stack, newest first. Finished outputs are kept only when the build ran to its end: a
        cancelled or timed-out build publishes nothing."""
        # The staging group holds the VM (on Azure, deleting the group deletes the VM), so abort keeps both.
        kept = self._abort_keeps | {"staging"} if aborted else set()
        for undo in reversed(list(self._status.pending_cleanup)):
            if keep_outputs and undo.owner in self._finished_outputs:
                done = True
            elif undo.owner in kept:
                self._status.kept_on_abort += [r for r in self._status.resources if r.owner == undo.owner]
                done = True
            else:
                done = await self._run_undo(undo)
            if done:
                self._status.pending_cleanup.remove(undo)

    async def _run_undo(self, undo: PendingUndo) -> bool:
        """Run one undo; False if it failed for good (the janitor's to finish)."""
        record = StepRecord(name=f"{CLEANUP}: {undo.label}", started=workflow.now())
        self._status.steps.append(record)
        try:
            # By name, with the request as the status holds it: the janitor runs these the same way.
            await workflow.execute_activity(
                undo.activity,
                undo.request,
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=HEARTBEAT,
                retry_policy=CLEANUP_RETRY,
                cancellation_type=WAIT,
                summary=record.name,
            )
        except ActivityError as err:
            if is_cancelled_exception(err):  # the build stopped while it freed a VM early: the undo stays stacked
                record.outcome, record.ended = "canceled", workflow.now()
                raise
            # Only a non-retryable error gets here (say, a lost permission); the janitor retries later.
            record.outcome, record.message, record.ended = "failed", cause_of(err), workflow.now()
            workflow.logger.warning("%s failed, left for the janitor: %s", undo.label, record.message)
            return False
        record.outcome, record.ended = "succeeded", workflow.now()
        self._status.resources = [r for r in self._status.resources if r.owner != undo.owner]
        return True

    def _outcome(self) -> tuple[RunState, str]:
        outputs = self._status.run_outputs
        failed = [o for o in outputs if o.provisioning_state == "Failed"]
        if self._validation_failed:
            distributed = " Outputs were distributed (continueDistributeOnFailure)." if outputs else ""
            return RunState.FAILED, f"Validation failed: {self._status.message}{distributed}"
        if not failed:
            return RunState.SUCCEEDED, ""
        summary = "; ".join(f"{o.run_output_name}: {o.message}" for o in failed)
        if len(failed) == len(outputs):
            return (
                RunState.FAILED,
                f"Failed in distributing {len(failed)} images out of total {len(outputs)}: {summary}",
            )
        return (
            RunState.PARTIALLY_SUCCEEDED,
            f"Failed in distributing {len(failed)} images out of total {len(outputs)}: {summary}",
        )

    def _failure_message(self, failure: BaseException) -> str:
        step = self._last_step()
        if isinstance(failure, BuildAborted):
            kept = ", ".join(r.id for r in self._status.kept_on_abort) or "the VM"
            return (
                f"{failure} failed; errorHandling is abort, so the VM and its parts are kept for debugging "
                f"(delete them yourself): {kept}. {self._log_hint()}"
            )
        cause = cause_of(failure)
        # An error the workflow raised itself (a template the source cannot take) is not a step's failure.
        own = not isinstance(failure, ActivityError)
        message = cause if own or cause.startswith(step) else f"{step} failed: {cause}"
        return message if self._status.log_uri in message else f"{message} {self._log_hint()}".strip()

    def _log_hint(self) -> str:
        return f"Image Build log location: {self._status.log_uri}" if self._status.log_uri else ""

    def _with_cleanup_notes(self, message: str) -> str:
        # The last failure of each undo still stacked (an early one may have been retried at the end).
        pending = {f"{CLEANUP}: {u.label}" for u in self._status.pending_cleanup}
        failed = {s.name: s.message for s in self._status.steps if s.name in pending and s.outcome == "failed"}
        if failed:
            notes = "; ".join(f"{name}: {why}" for name, why in failed.items())
            message = f"{message} Cleanup left resources behind, for `kiln janitor` to retry: {notes}".strip()
        return message

    def _last_step(self) -> str:
        work = [s for s in self._status.steps if not s.name.startswith(CLEANUP)]
        for step in reversed(work):
            if step.outcome in ("failed", "canceled", "running"):
                return step.name
        return work[-1].name if work else "the start"

    def _set_sub_state(self, sub_state: RunSubState) -> None:
        self._status.run_sub_state = sub_state

    def _set_state(self, state: RunState) -> None:
        self._status.run_state = state
        workflow.upsert_search_attributes([RUN_STATE.value_set(state.value)])

    def _finish(self, state: RunState, message: str) -> None:
        self._set_state(state)
        self._status.message = message
        self._status.end_time = workflow.now()
        workflow.set_current_details(f"**{state}** {message}")


def build_id_of(workflow_id: str, run_id: str) -> str:
    """A short, name-safe id, unique per run: every resource name of the build derives from it."""
    slug = re.sub(r"[^a-z0-9-]+", "-", workflow_id.lower()).strip("-")[:40] or "build"
    return f"{slug}-{run_id.replace('-', '')[:8]}"


async def settle(task: asyncio.Task[Any]) -> None:
    """Wait for ``task`` to end, even if a cancel request reaches this workflow meanwhile.

    Temporal delivers a cancel request once, as a CancelledError in the main task. One that comes while the
    build is already ending (timed out, failed, cleaning up) must not cut the cleanup short, so it is let go.
    """
    while not task.done():
        try:
            await asyncio.shield(task)
        except BaseException:
            pass  # the task's own outcome is read by the caller


def source_label(template: ImageTemplate) -> str:
    """The source as the build list shows it: ``publisher:offer:sku:version``, or the image id."""
    source = template.properties.source
    if source.type == "PlatformImage":
        return f"{source.publisher}:{source.offer}:{source.sku}:{source.version}"
    return source.image_id if source.type == "ManagedImage" else source.image_version_id


def guest_steps(template: ImageTemplate) -> list[tuple[str, Any]]:
    """Every customizer and validator with its JSON path, in the order they run."""
    steps: list[tuple[str, Any]] = [
        (f"properties.customize[{i}]", s) for i, s in enumerate(template.properties.customize)
    ]
    if template.properties.validation is not None:
        steps += [
            (f"properties.validate.inVMValidations[{i}]", s)
            for i, s in enumerate(template.properties.validation.in_vm_validations)
        ]
    return steps


def artifacts_of(template: ImageTemplate) -> list[Artifact]:
    """Every scriptUri and sourceUri of the customizers and validators, in order."""
    artifacts = []
    for path, step in guest_steps(template):
        if isinstance(step, ShellCustomizer | PowerShellCustomizer) and step.script_uri:
            artifacts.append(
                Artifact(source_uri=step.script_uri, sha256=step.sha256_checksum, field=f"{path}.scriptUri")
            )
        elif isinstance(step, FileCustomizer):
            artifacts.append(
                Artifact(source_uri=step.source_uri, sha256=step.sha256_checksum, field=f"{path}.sourceUri")
            )
    return artifacts


def guest_request(
    context: BuildContext,
    staging: Staging,
    vm: BuildVm,
    verb: str,
    path: str,
    steps: list[Any],
    index: int,
    staged_by_field: dict[str, StagedArtifact],
) -> GuestScriptRequest:
    """The request that runs ``steps[index]`` (a customizer, or a validator into validation.log) on ``vm``."""
    step = steps[index]
    return GuestScriptRequest(
        build=context,
        staging=staging,
        vm=vm,
        index=index,
        label=f"{verb} {index + 1}/{len(steps)}: {step.name or step.type}",
        step=step,
        staged=staged_for(f"{path}[{index}]", staged_by_field),
        log_name="validation.log" if verb == "validate" else "customization.log",
    )


def staged_for(path: str, staged_by_field: dict[str, StagedArtifact]) -> list[StagedArtifact]:
    return [s for field, s in staged_by_field.items() if field.rsplit(".", 1)[0] == path]


def guest_issues(template: ImageTemplate, source: ResolvedSource) -> list[TemplateIssue]:
    """What AIB refuses only once it knows the source's OS: on Linux the File customizer may write only to /tmp."""
    if source.os_type != "Linux":
        return []
    issues = []
    for path, step in guest_steps(template):
        if isinstance(step, FileCustomizer) and not step.destination.startswith("/tmp/"):
            issues.append(
                TemplateIssue(
                    path=f"{path}.destination",
                    message=f"'{step.destination}': on Linux the File customizer can only write under /tmp",
                )
            )
        elif step.type in WINDOWS_ONLY_STEPS:
            issues.append(TemplateIssue(path=f"{path}.type", message=f"{step.type} needs a Windows source image"))
    return issues


def cause_of(err: BaseException) -> str:
    """The message of the error at the bottom of a chain (ActivityError -> ApplicationError)."""
    while isinstance(err, ActivityError) and err.cause is not None:
        err = err.cause
    return str(err.message if isinstance(err, FailureError) else err)
