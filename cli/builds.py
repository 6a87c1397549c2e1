"""Builds as the CLI sees them: load a template, start a build, find one, read its status, map its outcome.

Nothing here prints; the commands decide how to show what these return.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.clouds.registry import CLOUDS, cloud_of, task_queue
from workflows.models import (
    CLOUD,
    RUN_STATE,
    SOURCE_IMAGE,
    TEMPLATE_NAME,
    BuildStatus,
    RunState,
)
from workflows.template import DeploymentContext, ImageTemplate, TemplateError, TemplateIssue, check_template_file

WORKFLOW_TYPE = "ImageBuild"
STATUS_QUERY = "status"
# A query waits for a worker to answer it; with no worker running it would wait for the full RPC deadline.
QUERY_TIMEOUT = timedelta(seconds=5)
# What Azure accepts in a resource name, since kiln names staging resources after the build.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_CANCELED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the output's reader went away
EXIT_CODES = {
    RunState.SUCCEEDED: EXIT_SUCCEEDED,
    RunState.PARTIALLY_SUCCEEDED: EXIT_PARTIAL,
    RunState.FAILED: EXIT_FAILED,
    RunState.CANCELED: EXIT_CANCELED,
}
TERMINATED = "The build was terminated: no cleanup ran; the janitor deletes what it left behind."
# What a build's state is when the workflow closed without its own code saying so.
CLOSED_STATES = {
    WorkflowExecutionStatus.COMPLETED: RunState.SUCCEEDED,
    WorkflowExecutionStatus.CANCELED: RunState.CANCELED,
}


class UsageError(Exception):
    """The request cannot be carried out as asked (an unknown build, a name in use); nothing was changed."""


@dataclass
class TemplateFile:
    """A template read from disk and validated: what ``kiln build`` sends, what it names the build after, and what
    AIB would accept only with a warning."""

    raw: dict
    name: str
    model: ImageTemplate
    warnings: list[TemplateIssue]

    @property
    def source_image(self) -> str:
        """The source as builds are listed and filtered by: ``publisher:offer:sku:version``, or the image id."""
        source = self.model.properties.source
        if source.type == "PlatformImage":
            return f"{source.publisher}:{source.offer}:{source.sku}:{source.version}"
        return source.image_id if source.type == "ManagedImage" else source.image_version_id


def read_template(
    path: Path,
    parameters: Path | None = None,
    *,
    deployment: DeploymentContext | None = None,
    cloud: str | None = None,
) -> TemplateFile:
    """Resolve an ARM wrapper (if any, where ``deployment`` says it is deployed) and validate the template, as
    the workflow will on ``cloud``.

    Raises:
        TemplateError: every problem found, each naming its JSON path (or the file, when it cannot be read).
    """
    try:
        checked = check_template_file(path, parameters, deployment=deployment, cloud=cloud)
    except TemplateError:
        raise
    except OSError as err:
        raise TemplateError([TemplateIssue(path=str(err.filename or path), message=err.strerror or str(err))]) from err
    except ValueError as err:  # not text (load_template reports bad JSON itself)
        raise TemplateError([TemplateIssue(path=str(path), message=f"cannot read: {err}")]) from err
    return TemplateFile(
        raw=checked.body, name=checked.name or path.stem, model=checked.template, warnings=checked.warnings
    )


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"{name!r} cannot name a build: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (pass --name)"
        )


async def start_build(client: Client, template: TemplateFile, *, name: str, cloud: str) -> WorkflowHandle:
    """Start the build workflow, with the search attributes the build list filters on set from the start.

    Raises:
        UsageError: a build of that name is still running (a finished one is replaced by a new run).
    """
    check_name(name)
    try:
        return await client.start_workflow(
            WORKFLOW_TYPE,
            template.raw,
            id=name,
            task_queue=task_queue(cloud),
            result_type=BuildStatus,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(TEMPLATE_NAME, template.name),
                    SearchAttributePair(CLOUD, cloud),
                    SearchAttributePair(SOURCE_IMAGE, template.source_image),
                    SearchAttributePair(RUN_STATE, RunState.RUNNING.value),
                ]
            ),
            static_summary=f"{template.name} from {template.source_image} ({cloud})",
        )
    except WorkflowAlreadyStartedError:
        raise UsageError(
            f"a build named {name} is already running: watch it with `kiln watch {name}`, stop it with "
            f"`kiln cancel {name}`, or start this one under another --name"
        ) from None


@dataclass
class Build:
    """A build found by name: a handle pinned to its latest run, and what the server knows of that run."""

    handle: WorkflowHandle
    execution: WorkflowExecution

    @property
    def running(self) -> bool:
        return self.execution.status == WorkflowExecutionStatus.RUNNING

    async def refresh(self) -> None:
        self.execution = await self.handle.describe()


async def get_build(client: Client, name: str) -> Build:
    """The latest run of the build called ``name``.

    Raises:
        UsageError: there is no build by that name (or the name belongs to another kind of workflow).
    """
    try:
        execution = await client.get_workflow_handle(name).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise UsageError(f"no build named {name}") from None
        raise
    if execution.workflow_type != WORKFLOW_TYPE:
        raise UsageError(f"no build named {name} ({name} is a {execution.workflow_type} workflow)")
    # Pinned to this run, so a new build of the same name started meanwhile is not mistaken for it.
    handle = client.get_workflow_handle(name, run_id=execution.run_id, result_type=BuildStatus)
    return Build(handle=handle, execution=execution)


async def query_status(build: Build) -> BuildStatus | None:
    """The workflow's own status, or None when no worker answered in time (none is running for its queue)."""
    try:
        status = await build.handle.query(STATUS_QUERY, result_type=BuildStatus, rpc_timeout=QUERY_TIMEOUT)
    except RPCError as err:
        if err.status in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED):
            return None
        raise
    return reconcile(status, build.execution)


async def get_status(build: Build) -> tuple[BuildStatus, str]:
    """The best picture of a build there is, and a note when it is incomplete.

    The status query is preferred; without a worker to answer it, a closed build's result still tells how it
    ended, and a running one shows only its state.
    """
    if (status := await query_status(build)) is not None:
        return status, ""
    if not build.running:
        return await outcome(build), ""
    state = build.execution.typed_search_attributes.get(RUN_STATE) or RunState.RUNNING.value
    placeholder = BuildStatus(template_name=build.handle.id, run_state=RunState(state))
    return placeholder, no_worker_note(build)


def no_worker_note(build: Build) -> str:
    queue = build.execution.task_queue
    cloud = cloud_of(queue) if cloud_of(queue) in CLOUDS else None
    start = f"one with `python worker.py --cloud {cloud}`" if cloud else "a worker for it"
    return f"no worker answered on task queue {queue}: start {start}"


async def outcome(build: Build) -> BuildStatus:
    """How a closed build ended, read from its result: what is left when no worker can answer a query."""
    try:
        return await build.handle.result()
    except WorkflowFailureError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.details:
            # BuildFailed and BuildTimedOut carry the final status; the converter hands it back as a dict.
            return BuildStatus.model_validate(cause.details[0])
        state = RunState.CANCELED if isinstance(cause, CancelledError) else RunState.FAILED
        message = TERMINATED if isinstance(cause, TerminatedError) else str(cause)
        return BuildStatus(template_name=build.handle.id, run_state=state, message=message)


def reconcile(status: BuildStatus, execution: WorkflowExecution) -> BuildStatus:
    """A closed workflow whose status still says Running was ended without its code running (terminated)."""
    if status.finished or execution.status == WorkflowExecutionStatus.RUNNING:
        return status
    if execution.status == WorkflowExecutionStatus.TERMINATED:
        return status.model_copy(update={"run_state": RunState.FAILED, "message": TERMINATED})
    state = CLOSED_STATES.get(execution.status, RunState.FAILED)
    return status.model_copy(update={"run_state": state})


def exit_code(status: BuildStatus) -> int:
    return EXIT_CODES.get(status.run_state, EXIT_FAILED)


def run_state_of(execution: WorkflowExecution) -> str:
    """A listed build's state: its search attribute, or the workflow's status if it closed without setting one."""
    if execution.status == WorkflowExecutionStatus.TERMINATED:
        return "Terminated"  # terminate runs no workflow code, so the attribute still says Running
    state = execution.typed_search_attributes.get(RUN_STATE)
    return state or (execution.status.name.title() if execution.status else "")
