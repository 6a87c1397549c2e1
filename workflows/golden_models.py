"""Models of golden images over time: the ImageTemplate entity's state, its runs, its SourceImage trigger,
the runs schedules ask for, and the events webhooks are told of.

Everything here crosses the workflow sandbox and the data converter, so it is plain pydantic with no I/O.
Field names follow AIB where AIB has them (``lastRunStatus``, ``runState``, trigger ``status.code``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from workflows.camel import CamelModel
from workflows.models import RunOutput

# A run the entity decided not to build: a schedule found the source unchanged, or a build was still running.
SKIPPED = "Skipped"
# The run's reason: who asked for it.
RunReason = Literal["manual", "autoRun", "schedule", "trigger"]
# A scheduled run's start condition, as EC2 Image Builder has them (EXPRESSION_MATCH_ONLY and
# EXPRESSION_MATCH_AND_DEPENDENCY_UPDATES_AVAILABLE).
StartCondition = Literal["always", "source-changed"]
WebhookFormat = Literal["json", "slack", "teams"]
# An entity continues as new past this many history events (Temporal warns at 10,240 and stops at 51,200).
HISTORY_LIMIT = 5_000


def entity_id(name: str) -> str:
    """The workflow id of template ``name``'s entity; builds are named apart from it (``name-1``, ``name-2``)."""
    return f"kiln-template-{name}"


class TemplateRevision(CamelModel):
    """One version of the template body, as it was created or updated: each run records the one it built."""

    revision: int
    template: dict[str, Any]
    created: datetime


class ArtifactDigest(CamelModel):
    """A staged scriptUri or sourceUri and the sha256 of the bytes staged."""

    source_uri: str
    sha256: str


class RunRecord(CamelModel):
    """One run of the template: a build (its workflow id is ``build``), or a run that was skipped. The lineage of
    what it made: the template revision, the exact source version and the sha256 of every staged artifact."""

    number: int
    reason: RunReason
    requested_by: str = ""
    build: str = ""
    revision: int
    run_state: str = "Running"
    message: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    source_exact_version: str = ""
    source_image_id: str = ""
    log_uri: str = ""
    run_outputs: list[RunOutput] = []
    artifacts: list[ArtifactDigest] = []

    @property
    def finished(self) -> bool:
        return self.run_state not in ("Running", "Canceling")


class TriggerStatus(CamelModel):
    """AIB's trigger ``properties.status``."""

    code: Literal["Healthy", "Unhealthy"] = "Healthy"
    message: str = "Trigger is active."
    time: datetime | None = None


class SourceTrigger(CamelModel):
    """A SourceImage trigger: it builds when the ``latest`` source resolves to a version not yet seen. Each failed
    build it started counts; ``failure_limit`` in a row deactivates it, and a successful manual build (or a
    ``run``) activates it again, as AIB does since September 2024."""

    name: str
    kind: Literal["SourceImage"] = "SourceImage"
    interval_seconds: float = Field(3600.0, ge=1)
    failure_limit: int = Field(3, ge=1)
    enabled: bool = True
    status: TriggerStatus = TriggerStatus()
    consecutive_failures: int = 0
    last_source_version: str = ""


class Retirement(CamelModel):
    """What became of an output version: revoked (excluded from latest, never built from), given an end-of-life
    date, or deleted by retention."""

    version_id: str
    action: Literal["revoked", "end-of-life", "deleted"]
    end_of_life: datetime | None = None
    note: str = ""


class Webhook(CamelModel):
    url: str
    format: WebhookFormat = "json"


class TemplateState(CamelModel):
    """Everything the entity holds; continue-as-new passes it on whole, so nothing is lost across runs."""

    name: str
    cloud: str
    revisions: list[TemplateRevision]
    runs: list[RunRecord] = []
    trigger: SourceTrigger | None = None
    webhooks: list[Webhook] = []
    # What became of this template's output versions since they were made, by version id.
    retired: dict[str, Retirement] = {}
    # Whether autoRun was looked at: it builds once, when the template is created, not on each continue-as-new.
    auto_run_done: bool = False
    events_sent: int = 0
    history_limit: int = HISTORY_LIMIT
    generation: int = 1
    deleted: bool = False

    @property
    def current(self) -> TemplateRevision:
        return self.revisions[-1]

    @property
    def running(self) -> RunRecord | None:
        return next((r for r in reversed(self.runs) if r.build and not r.finished), None)

    @property
    def last_run_status(self) -> RunRecord | None:
        """AIB's lastRunStatus: the last run that built (a skipped run built nothing)."""
        return next((r for r in reversed(self.runs) if r.run_state != SKIPPED), None)

    def last_success(self) -> RunRecord | None:
        return next((r for r in reversed(self.runs) if r.run_state in ("Succeeded", "PartiallySucceeded")), None)


class RunRequest(CamelModel):
    """Ask the entity to build. ``when`` source-changed builds only if the resolved source or the template changed
    since the last successful build. ``notify_workflow``: a workflow to signal ``build_ended`` when the build ends
    (a schedule's run waits for it, so the schedule's overlap policy sees the build)."""

    reason: RunReason = "manual"
    requested_by: str = ""
    when: StartCondition = "always"
    notify_workflow: str = ""


class UpdateTemplateRequest(CamelModel):
    template: dict[str, Any]
    webhooks: list[Webhook] | None = None


class TriggerRequest(CamelModel):
    name: str = "source"
    interval_seconds: float = Field(3600.0, ge=1)
    failure_limit: int = Field(3, ge=1)


class ScheduledRunRequest(CamelModel):
    """What a schedule's action starts: one run of ``template``, under the schedule's start condition."""

    template: str
    schedule: str
    when: StartCondition = "source-changed"


class SourceCheckRequest(CamelModel):
    """Resolve the template's source now, as a build would: a ``latest`` to its exact version."""

    name: str
    template: dict[str, Any]


class NotificationEvent(CamelModel):
    """One thing a webhook is told of. ``id`` is the same on every delivery attempt, so a receiver can tell a
    retried delivery from a new event."""

    id: str
    kind: Literal[
        "build.succeeded",
        "build.failed",
        "build.partiallySucceeded",
        "build.canceled",
        "trigger.fired",
        "trigger.disabled",
        "schedule.skipped",
    ]
    template: str
    time: datetime
    build: str = ""
    run_state: str = ""
    message: str = ""
    outputs: list[RunOutput] = []
    log_uri: str = ""
    source_exact_version: str = ""


class Delivery(CamelModel):
    event: NotificationEvent
    webhook: Webhook


class OutputLineage(CamelModel):
    """One output version and what it was made from."""

    version_id: str
    type: str
    run_output_name: str
    template: str
    build: str
    run: int
    revision: int
    source_image_id: str
    source_exact_version: str
    artifacts: list[ArtifactDigest] = []
    made: datetime | None = None
    retired: Retirement | None = None


class TemplateLineage(CamelModel):
    name: str
    cloud: str
    # The gallery version the current revision names as its source, when it pins one.
    pinned_source: str = ""
    # The version the template's last build was made from.
    last_source: str = ""
    outputs: list[OutputLineage] = []


class RetireRequest(CamelModel):
    version_id: str
    action: Literal["revoked", "end-of-life", "deleted"]
    end_of_life: datetime
    note: str = ""
    template: str = ""


class RevokeRequest(CamelModel):
    """Revoke these versions (a version and, with ``--descendants``, what was built from it)."""

    versions: list[RetireRequest]


class RetentionRequest(CamelModel):
    """Keep the newest ``keep`` gallery versions of template ``template`` (or of the gallery image definition
    ``image_definition``, whichever templates made them), and any still used as a source by another template; the
    rest are deleted (or, with ``action`` end-of-life, dated)."""

    template: str = ""
    image_definition: str = ""
    keep: int = Field(3, ge=1)
    action: Literal["delete", "end-of-life"] = "delete"
    dry_run: bool = False

    @model_validator(mode="after")
    def _one_scope(self) -> RetentionRequest:
        if bool(self.template) == bool(self.image_definition):
            raise ValueError("name a template or a gallery image definition to apply retention to, not both")
        return self


class RetentionReport(CamelModel):
    kept: list[str] = []
    in_use: list[str] = []
    retired: list[str] = []
    dry_run: bool = False
