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
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

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

if TYPE_CHECKING:
    from activities.guest.base import GuestSession

# How a distribution records a resume point (its heartbeat details); a retry gets the last one back as ``resume``.
Progress = Callable[[dict[str, Any]], None]


class PermanentError(ApplicationError):
    """A failure no retry can fix: bad input, a missing permission or quota, a script that failed.

    ``kind`` is the error type the workflow and CLI see (``ChecksumMismatch``, ``QuotaExceeded``, ...).
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message, type=kind, non_retryable=True)


class LogSink(Protocol):
    """An append-only build log in staging storage (``customization.log``, ``validation.log``)."""

    uri: str
    """Where the log can be read: the URL the build's status and failure messages name."""

    async def append(self, data: bytes) -> None:
        """Add ``data`` at the end. An append retried after a lost answer is not written twice."""

    async def read(self) -> bytes:
        """The whole log: a step that a new worker takes over finds in it how far the last one got."""


class Cloud(Protocol):
    """Where builds happen: one instance per worker, shared by every build the worker runs.

    Every method is called from an activity, so it may do I/O; none is called from workflow code.
    """

    name: str
    """The cloud's name in the registry (``local``, ``azure``), as the build's status and worker log show it."""

    secret: bytes
    """The worker secret the build VMs' credentials derive from (``activities/guest/keys.py``): the login key or
    admin password a VM is made with, and the one a session to it logs in with, on whichever worker takes the
    build over. Workers of one cloud must share it."""

    async def resolve_source(self, build: BuildContext, template: ImageTemplate) -> ResolvedSource:
        """Pin the source image (``latest`` to an exact version) and refuse, before anything is made, whatever
        of the template this cloud cannot build (an unknown image, a Windows source on the local cloud, a region
        it does not have, a distribution target that cannot be written), with a message that names the field.

        Raises:
            PermanentError: the template cannot be built here; nothing was made.
        """

    async def create_staging(self, build: BuildContext) -> Staging:
        """Create-or-get the build's staging group (``IT_<rg>_<template>_<guid>``, or the user's
        stagingResourceGroup, which must be empty) and its storage for staged artifacts and logs.

        Raises:
            PermanentError: a given stagingResourceGroup is not empty, or belongs elsewhere.
        """

    async def delete_staging(self, build: BuildContext) -> None:
        """Delete what ``create_staging`` made: the whole group if kiln created it, only kiln's resources in a
        group the user gave. Logs stay where the cloud keeps them. Succeeds when already gone."""

    async def stage_artifact(
        self, build: BuildContext, staging: Staging, artifact: Artifact, data: bytes
    ) -> StagedArtifact:
        """Store one fetched and checked scriptUri or sourceUri in staging storage, where steps read it."""

    async def read_staged(self, build: BuildContext, staged: StagedArtifact) -> bytes:
        """The bytes ``stage_artifact`` stored, for a step that runs or copies them."""

    async def read_url(self, build: BuildContext, staged: StagedArtifact) -> str:
        """A short-lived read-only URL of a staged artifact, for a build VM to fetch it itself: a Windows guest
        fetches a large File customizer's source this way instead of taking it through WinRM. Only clouds that
        build Windows images are asked for one. The URL is a credential: it goes into no log, status or history."""

    async def open_log(self, build: BuildContext, staging: Staging, name: str) -> LogSink:
        """Open (creating on first use) the build's log ``name``; a worker taking over appends to the same log."""

    async def create_vm(self, build: BuildContext, staging: Staging, spec: VmSpec) -> BuildVm:
        """Create-or-get a VM (the build VM from the source, or the validation VM from the captured image) and
        wait until it answers, returning only public facts about it (address, admin user, pinned host key).

        Raises:
            PermanentError: the VM can never be made as asked (quota, permission, an image that cannot boot).
        """

    async def delete_vm(self, build: BuildContext, name: str) -> None:
        """Delete a VM and every part made for it (disk, NIC, address, overlay...). Succeeds when already gone."""

    def agent_session(self, build: BuildContext, vm: BuildVm) -> AbstractAsyncContextManager[GuestSession]:
        """A root session into a running Linux build VM through the cloud's own way in (its namespaces on this
        machine, Run Command on Azure), not its network login: how a worker that takes over a deprovision reads
        how the deprovision went, once it has deleted the admin user and the host keys a login needs.

        Raises:
            PermanentError: ``NoAgentSession`` for a VM the cloud has no such way into.
        """

    async def capture_image(
        self, build: BuildContext, staging: Staging, vm: BuildVm, spec: CaptureSpec
    ) -> CapturedImage:
        """Stop the generalized VM and capture its disk as the image every distribution target is made from.
        A retry after success returns the same image."""

    async def delete_image(self, build: BuildContext, name: str) -> None:
        """Delete a captured image and what was made to capture it. Succeeds when already gone."""

    async def distribute(
        self, request: DistributeRequest, *, resume: dict[str, Any] | None, progress: Progress
    ) -> RunOutput:
        """Make one distribution target. ``progress`` records a resume point (heartbeat details); after a worker
        restart the call gets it back as ``resume`` and picks up the long-running operation instead of starting over.
        Success is judged by the resource's final state, not by how long the call took.

        Returns:
            The target's runOutput; a failed target raises instead, and the build reports it as failed.
        """

    async def delete_output(self, build: BuildContext, target: Distributor, index: int) -> None:
        """Remove what an unfinished distribution left (a half-replicated version, a partial VHD), and only what
        this build wrote. Succeeds when nothing is there."""

    async def retire_image_version(
        self, version_id: str, *, end_of_life: datetime, exclude_from_latest: bool, revoked: str = ""
    ) -> None:
        """Give a gallery image version an end-of-life date and, if asked, take it out of what ``latest`` resolves
        to. ``revoked`` (why it was revoked) marks it so that ``resolve_source`` refuses to build from it.

        Raises:
            PermanentError: ImageVersionNotFound, there is no such version.
        """

    async def delete_image_version(self, version_id: str) -> None:
        """Delete a gallery image version and its replicas. Succeeds when already gone."""

    async def delete_tagged(self, build_id: str) -> list[str]:
        """Delete what still carries build ``build_id``'s tag and is temporary, with the same deletes the undos
        use: the janitor's sweep of a closed build, for what no undo names (a create whose undo was never
        recorded, or whose build was terminated before it could be). Outputs and logs (``kilnRole``) are the
        user's and stay. Called only for builds whose workflow is closed. Succeeds when nothing is left.

        Returns:
            The ids of what was deleted.
        """

    async def close(self) -> None:
        """Release the cloud's clients and connections when the worker stops."""
