"""What a cloud must do for a build. The workflow and activities are written against this alone.

Rules every implementation keeps (the saga depends on them):
- Names come from the build id, so a create that is retried, or repeated by another worker, finds what the
  first attempt made instead of making a second one (create-or-get).
- A delete succeeds when the thing is already gone.
- Errors that retrying cannot fix raise ``PermanentError``; anything else is retried by the activity's policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from temporalio.exceptions import ApplicationError

from workflows.models import (
    Artifact,
    BuildContext,
    BuildVm,
    CapturedImage,
    CaptureSpec,
    DistributeRequest,
    ResolvedSource,
    RunOutput,
    StagedArtifact,
    Staging,
    VmSpec,
)
from workflows.template import Distributor, ImageTemplate

# How a distribution records a resume point (its heartbeat details); a retry gets the last one back as ``resume``.
Progress = Callable[[dict[str, Any]], None]


class PermanentError(ApplicationError):
    """A failure no retry can fix: bad input, a missing permission or quota, a script that failed.

    ``kind`` is the error type the workflow and CLI see (``ChecksumMismatch``, ``QuotaExceeded``, ...).
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message, type=kind, non_retryable=True)


class LogSink(Protocol):
    """An append-only log in staging storage (``customization.log``)."""

    uri: str

    async def append(self, data: bytes) -> None: ...

    async def read(self) -> bytes:
        """The whole log: a step that a new worker takes over finds in it how far the last one got."""


class Cloud(Protocol):
    name: str
    # The worker secret the build VMs' credentials derive from (guest/keys.py): the login key or admin password
    # a VM is made with, and the one a session to it logs in with, on whichever worker takes the build over.
    secret: bytes

    async def resolve_source(self, build: BuildContext, template: ImageTemplate) -> ResolvedSource:
        """Pin the source image (``latest`` to an exact version) and refuse, before anything is made, whatever
        of the template this cloud cannot build (an unknown image, a Windows source on the local cloud, a region
        it does not have), with a message that names the field."""

    async def create_staging(self, build: BuildContext) -> Staging: ...

    async def delete_staging(self, build: BuildContext) -> None: ...

    async def stage_artifact(
        self, build: BuildContext, staging: Staging, artifact: Artifact, data: bytes
    ) -> StagedArtifact: ...

    async def read_staged(self, build: BuildContext, staged: StagedArtifact) -> bytes: ...

    async def read_url(self, build: BuildContext, staged: StagedArtifact) -> str:
        """A short-lived read-only URL of a staged artifact, for a build VM to fetch it itself: a Windows guest
        fetches a large File customizer's source this way instead of taking it through WinRM. Only clouds that
        build Windows images are asked for one. The URL is a credential: it goes into no log, status or history."""

    async def open_log(self, build: BuildContext, staging: Staging, name: str) -> LogSink: ...

    async def create_vm(self, build: BuildContext, staging: Staging, spec: VmSpec) -> BuildVm: ...

    async def delete_vm(self, build: BuildContext, name: str) -> None: ...

    async def capture_image(
        self, build: BuildContext, staging: Staging, vm: BuildVm, spec: CaptureSpec
    ) -> CapturedImage: ...

    async def delete_image(self, build: BuildContext, name: str) -> None: ...

    async def distribute(
        self, request: DistributeRequest, *, resume: dict[str, Any] | None, progress: Progress
    ) -> RunOutput:
        """Make one distribution target. ``progress`` records a resume point (heartbeat details); after a worker
        restart the call gets it back as ``resume`` and picks up the long-running operation instead of starting over.
        Success is judged by the resource's final state, not by how long the call took."""

    async def delete_output(self, build: BuildContext, target: Distributor, index: int) -> None:
        """Remove what an unfinished distribution left (a half-replicated version, a partial VHD)."""

    async def close(self) -> None:
        """Release the cloud's clients and connections when the worker stops."""
