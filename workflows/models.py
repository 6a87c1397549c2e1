"""Status, result and activity models of a build.

Everything here crosses the workflow sandbox and the data converter, so it is plain pydantic with no I/O.
Status field names follow AIB's ``lastRunStatus`` and ``runOutputs`` so an AIB user reads them as they know them.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import model_validator
from temporalio.common import SearchAttributeKey

from workflows.camel import CamelModel
from workflows.template import (
    Distributor,
    FileCustomizer,
    ImageTemplate,
    PowerShellCustomizer,
    ShellCustomizer,
    TemplateIssue,
    VmProfile,
    WindowsRestartCustomizer,
    WindowsUpdateCustomizer,
)

# Search attributes: the Web UI's list and `kiln list` filter builds by these.
TEMPLATE_NAME = SearchAttributeKey.for_keyword("KilnTemplate")
RUN_STATE = SearchAttributeKey.for_keyword("KilnRunState")
CLOUD = SearchAttributeKey.for_keyword("KilnCloud")
SOURCE_IMAGE = SearchAttributeKey.for_keyword("KilnSourceImage")
# Every resource a build makes is tagged with this id; the janitor finds a build's workflow by it.
BUILD_ID = SearchAttributeKey.for_keyword("KilnBuildId")
# The cleanup steps a finished build left for the janitor (they failed for good, or the same way again and again).
CLEANUP_LEFT = SearchAttributeKey.for_keyword("KilnCleanupLeft")
SEARCH_ATTRIBUTES = [TEMPLATE_NAME, RUN_STATE, CLOUD, SOURCE_IMAGE, BUILD_ID, CLEANUP_LEFT]


class RunState(StrEnum):
    RUNNING = "Running"
    CANCELING = "Canceling"
    SUCCEEDED = "Succeeded"
    PARTIALLY_SUCCEEDED = "PartiallySucceeded"
    FAILED = "Failed"
    CANCELED = "Canceled"


class RunSubState(StrEnum):
    QUEUED = "Queued"
    BUILDING = "Building"
    CUSTOMIZING = "Customizing"
    OPTIMIZING = "Optimizing"
    VALIDATING = "Validating"
    DISTRIBUTING = "Distributing"


class Resource(CamelModel):
    """One cloud resource a build made. ``owner`` is the undo entry that deletes it."""

    id: str
    kind: str
    owner: str = ""


class BuildContext(CamelModel):
    """What every activity needs to know about the build it works for."""

    build_id: str
    template_name: str
    location: str
    cloud: str
    tags: dict[str, str] = {}
    managed_resource_tags: dict[str, str] = {}
    staging_resource_group: str | None = None
    destination_resource_group: str = ""


class ResolvedSource(CamelModel):
    """The source image pinned at build time: ``latest`` becomes an exact version here."""

    image_id: str
    exact_version: str
    os_type: Literal["Linux", "Windows"] = "Linux"
    hyper_v_generation: Literal["V1", "V2"] = "V2"
    size_bytes: int = 0
    # Why the version was revoked (``kiln images revoke``); a build refuses a revoked source.
    revoked: str = ""
    security_type: str = "Standard"
    """The source's ``SecurityType`` feature (TrustedLaunchSupported, ConfidentialVMSupported...): the security
    type a gallery target's image definition must match."""
    build_security_type: Literal["Standard", "TrustedLaunch"] = "Standard"
    """The build VM's, as the targets need it (``aib.targets.build_security``)."""


class Staging(CamelModel):
    """The staging group and storage of one build."""

    resource_group_id: str
    created_group: bool
    storage_uri: str
    log_uri_prefix: str
    resources: list[Resource] = []


class Artifact(CamelModel):
    """A scriptUri or sourceUri to fetch, check and stage."""

    source_uri: str
    sha256: str = ""
    field: str


class StagedArtifact(CamelModel):
    source_uri: str
    staged_uri: str
    sha256: str
    size: int


class VmSpec(CamelModel):
    """A VM to make: the build VM from the source, or the validation VM from the captured image."""

    name: str
    purpose: Literal["build", "validation", "optimization"]
    image_id: str
    source: ResolvedSource
    vm_profile: VmProfile
    data_disk_sizes_gb: list[int] = []
    """additionalDataDisks: empty data disks of these sizes, at LUN 0, 1..., on the build VM only."""
    security_type: Literal["Standard", "TrustedLaunch"] = "Standard"
    """TrustedLaunch: secure boot and vTPM on, where the cloud has them (``ResolvedSource.build_security_type``)."""


class BuildVm(CamelModel):
    """How to reach a build VM. Holds only public facts: the host key is pinned, the login key never leaves a worker."""

    name: str
    host: str
    port: int
    admin_user: str
    host_key: str
    os_type: Literal["Linux", "Windows"] = "Linux"
    resources: list[Resource] = []


GuestStep = ShellCustomizer | PowerShellCustomizer | FileCustomizer | WindowsRestartCustomizer | WindowsUpdateCustomizer


class GuestScriptRequest(CamelModel):
    """Run one customizer or validator (or the deprovision step) on a VM, streaming its output to ``log_name``."""

    build: BuildContext
    staging: Staging
    vm: BuildVm
    index: int
    label: str
    step: GuestStep | None = None
    staged: list[StagedArtifact] = []
    log_name: Literal["customization.log", "validation.log"] = "customization.log"


class GuestScriptResult(CamelModel):
    exit_code: int
    duration_seconds: float


class CaptureSpec(CamelModel):
    name: str
    os_disk_size_gb: int = 0


class CapturedImage(CamelModel):
    """The generalized image every distribution target is made from. ``boot_check``: the cloud boots it before
    distribution even when the template has no validators (the local cloud does; AIB itself does not)."""

    id: str
    boot_check: bool = False
    uri: str = ""
    size_bytes: int = 0
    used_bytes: int = 0
    hyper_v_generation: Literal["V1", "V2"] = "V2"
    data_disk_snapshots: list[str] = []
    """The build VM's data disks as captured, by LUN (Azure: snapshot ids; local: file URIs of fixed VHDs), which
    managed image targets and gallery versions are made with."""
    resources: list[Resource] = []


class DistributeRequest(CamelModel):
    build: BuildContext
    staging: Staging
    image: CapturedImage
    source: ResolvedSource
    target: Distributor
    index: int


class RunOutput(CamelModel):
    """AIB's runOutput for one distribution target, with per-region replication status."""

    run_output_name: str
    type: str
    artifact_id: str = ""
    artifact_uri: str = ""
    provisioning_state: Literal["Succeeded", "Failed", "Running"] = "Succeeded"
    message: str = ""
    replication: dict[str, str] = {}


class PendingUndo(CamelModel):
    """One compensation still to run: the activity that deletes what ``owner`` made, and its request.

    The status carries the whole undo stack, so the janitor can finish the cleanup of a build that was
    terminated (terminate runs no workflow code) from nothing but the build's last status. ``activity`` is the
    undo's activity by the name history records (``delete_vm``; see ``workflows.undo``), ``request`` its request
    as JSON.
    """

    owner: str
    label: str
    activity: str
    request: dict[str, Any]


class StepRecord(CamelModel):
    """One step of the build as the status shows it: what AIB does not tell you. ``kind`` tells the build's own
    steps from its cleanup (each undo run)."""

    name: str
    kind: Literal["build", "cleanup"] = "build"
    started: datetime
    ended: datetime | None = None
    outcome: Literal["running", "succeeded", "failed", "canceled"] = "running"
    message: str = ""


class BuildStatus(CamelModel):
    """AIB's lastRunStatus and runOutputs, plus each step and the resources still alive."""

    build_id: str = ""
    template_name: str = ""
    cloud: str = ""
    run_state: RunState = RunState.RUNNING
    run_sub_state: RunSubState = RunSubState.QUEUED
    message: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    deadline: datetime | None = None
    exact_staging_resource_group: str = ""
    source_exact_version: str = ""
    source_image_id: str = ""
    log_uri: str = ""
    run_outputs: list[RunOutput] = []
    steps: list[StepRecord] = []
    resources: list[Resource] = []
    kept_on_abort: list[Resource] = []
    pending_cleanup: list[PendingUndo] = []
    # Every scriptUri and sourceUri the build staged, with the sha256 of the bytes staged: the build's lineage.
    staged_artifacts: list[StagedArtifact] = []
    # What AIB accepts only with a warning (say, a field an older apiVersion drops), each at its path.
    warnings: list[TemplateIssue] = []

    @property
    def finished(self) -> bool:
        return self.run_state not in (RunState.RUNNING, RunState.CANCELING)


class ValidatedTemplate(CamelModel):
    """What template validation records in a build's history: the template as accepted (every field by its JSON
    name, defaults filled in) and what AIB would accept only with a warning."""

    template: dict[str, Any]
    warnings: list[TemplateIssue] = []

    @model_validator(mode="before")
    @classmethod
    def _recorded_before_warnings(cls, data: Any) -> Any:
        # Builds that validated before warnings were recorded hold the accepted template alone: a template has
        # no "template" field of its own, so the shape tells them apart.
        if isinstance(data, dict) and "template" not in data:
            return {"template": data}
        return data


class DeadlineRequest(CamelModel):
    seconds: float


class DeleteRequest(CamelModel):
    """Undo one create. Names are derived from the build id, so a delete works even if the create never returned."""

    build: BuildContext
    name: str


class DeleteOutputRequest(CamelModel):
    """Remove what an unfinished distribution target left behind."""

    build: BuildContext
    target: Distributor
    index: int


class ResolveSourceRequest(CamelModel):
    build: BuildContext
    template: ImageTemplate


class StageArtifactsRequest(CamelModel):
    build: BuildContext
    staging: Staging
    artifacts: list[Artifact]


class CreateVmRequest(CamelModel):
    build: BuildContext
    staging: Staging
    spec: VmSpec


class CaptureRequest(CamelModel):
    build: BuildContext
    staging: Staging
    vm: BuildVm
    spec: CaptureSpec


class JanitorRequest(CamelModel):
    """Which closed builds to look at: those that closed within ``lookback_hours``, on one task queue or all."""

    lookback_hours: float = 24.0
    task_queue: str | None = None


class AbandonedBuild(CamelModel):
    workflow_id: str
    run_id: str
    task_queue: str
    pending_cleanup: list[PendingUndo]


class ClosedBuild(CamelModel):
    """A build whose workflow is no longer running, for the janitor's sweep by tag on its own task queue."""

    workflow_id: str
    task_queue: str
    build_id: str


class JanitorReport(CamelModel):
    builds: list[str] = []
    cleaned: list[str] = []
    failed: list[str] = []
    # What the sweep by tag deleted, as ``<workflow id>: <resource id>``.
    swept: list[str] = []
