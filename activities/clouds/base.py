"""What a cloud must do for a build. The workflow and activities are written against this alone.

Rules every implementation keeps (the saga depends on them):
- Names come from the build id, so a create that is retried, or repeated by another worker, finds what the
  first attempt made instead of making a second one (create-or-get).
- A delete succeeds when the thing is already gone.
- Errors that retrying cannot fix raise ``PermanentError``; anything else is retried by the activity's policy.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
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


class PermanentError(ApplicationError):
    """A failure no retry can fix: bad input, a missing permission or quota, a script that failed.

    ``kind`` is the error type the workflow and CLI see (``ChecksumMismatch``, ``QuotaExceeded``, ...).
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message, type=kind, non_retryable=True)


@dataclass
class ScriptProgress:
    """New output of a script running on a guest since an offset, and its exit code once it has ended."""

    output: bytes
    exit_code: int | None


class GuestSession(Protocol):
    """A connection to a VM. Scripts run detached in the guest, so a worker that dies does not kill them and a
    new worker can attach to the same run by its id and read on from where the last one stopped."""

    async def upload(self, data: bytes, destination: str, *, mode: int = 0o644) -> None: ...

    async def path_exists(self, path: str) -> bool: ...

    async def start_script(self, run_id: str, script: str, *, as_root: bool = False) -> None:
        """Start ``script`` under ``run_id``; does nothing if that run has already started."""

    async def poll_script(self, run_id: str, offset: int) -> ScriptProgress: ...

    async def kill_script(self, run_id: str) -> None: ...


class LogSink(Protocol):
    """An append-only log in staging storage (``customization.log``)."""

    uri: str

    async def append(self, data: bytes) -> None: ...

    async def read(self) -> bytes:
        """The whole log: a step that a new worker takes over finds in it how far the last one got."""


class Cloud(Protocol):
    name: str

    async def resolve_source(self, build: BuildContext, template: ImageTemplate) -> ResolvedSource:
        """Pin the source image (``latest`` to an exact version) and refuse, before anything is made, whatever
        of the template this cloud cannot build (an unknown image, a Windows source on the local cloud, a region
        it does not have), with a message that names the field."""

    def deprovision_script(self, os_type: str) -> str:
        """The default generalize command (``waagent -force -deprovision+user`` or its local equivalent),
        run when the customizers did not write ``/tmp/DeprovisioningScript.sh``."""

    async def create_staging(self, build: BuildContext) -> Staging: ...

    async def delete_staging(self, build: BuildContext) -> None: ...

    async def stage_artifact(
        self, build: BuildContext, staging: Staging, artifact: Artifact, data: bytes
    ) -> StagedArtifact: ...

    async def read_staged(self, build: BuildContext, staged: StagedArtifact) -> bytes: ...

    async def open_log(self, build: BuildContext, staging: Staging, name: str) -> LogSink: ...

    async def create_vm(self, build: BuildContext, staging: Staging, spec: VmSpec) -> BuildVm: ...

    async def delete_vm(self, build: BuildContext, name: str) -> None: ...

    def connect(self, build: BuildContext, vm: BuildVm) -> AbstractAsyncContextManager[GuestSession]: ...

    async def capture_image(
        self, build: BuildContext, staging: Staging, vm: BuildVm, spec: CaptureSpec
    ) -> CapturedImage: ...

    async def delete_image(self, build: BuildContext, name: str) -> None: ...

    async def distribute(
        self,
        request: DistributeRequest,
        *,
        resume: dict[str, Any] | None,
        progress: Callable[[dict[str, Any]], None],
    ) -> RunOutput:
        """Make one distribution target. ``progress`` records a resume point (heartbeat details); after a worker
        restart the call gets it back as ``resume`` and picks up the long-running operation instead of starting over.
        Success is judged by the resource's final state, not by how long the call took."""

    async def delete_output(self, build: BuildContext, target: Distributor, index: int) -> None:
        """Remove what an unfinished distribution left (a half-replicated version, a partial VHD)."""

    async def close(self) -> None:
        """Release the cloud's clients and connections when the worker stops."""
