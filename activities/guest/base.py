"""What a build step needs of a guest, whatever its OS: a session that runs detached scripts, and the OS's rules.

A session is opened by the guest's OS profile (SSH for Linux, WinRM for Windows) from what the cloud supplies:
the VM's endpoint in ``BuildVm`` and the worker secret its credentials derive from. Everything that depends on
the OS, and nothing that depends on the cloud, lives behind ``OsProfile``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from workflows.models import BuildVm, GuestScriptRequest, GuestScriptResult, GuestStep
from workflows.template import ImageTemplate, TemplateIssue

if TYPE_CHECKING:
    from activities.clouds.base import LogSink


# How often a running script's new output is read, in seconds.
POLL_EVERY = 0.5


@dataclass
class ScriptProgress:
    """New output of a script running on a guest since an offset, and its exit code once it has ended."""

    output: bytes
    exit_code: int | None


class GuestSession(Protocol):
    """A connection to a VM. Scripts run detached in the guest, so a worker that dies does not kill them and a
    new worker can attach to the same run by its id and read on from where the last one stopped."""

    async def upload(self, data: bytes, destination: str, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``destination`` in the guest, replacing what is there."""

    async def path_exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest (a file a customizer may have written)."""

    async def start_script(
        self,
        run_id: str,
        script: str,
        *,
        as_root: bool = False,
        as_system: bool = False,
        environment: dict[str, str] | None = None,
    ) -> None:
        """Start ``script`` under ``run_id``, with ``environment`` added to its own; does nothing if that run has
        already started. On Linux the script runs as a file, by its own ``#!`` line, or by ``/bin/sh`` when it has
        none.

        ``as_root`` runs it with the admin's full rights (root; on Windows the admin elevated), ``as_system`` as
        the system itself (Windows' SYSTEM; root on Linux). Without either it runs as the admin user."""

    async def poll_script(self, run_id: str, offset: int) -> ScriptProgress:
        """The run's output from ``offset`` on, and its exit code once it has ended."""

    async def kill_script(self, run_id: str) -> None:
        """Stop the run and everything it started; does nothing if it has already ended."""


class Transport(Protocol):
    """How a profile reaches its guests: SSH, WinRM, or a test double."""

    def session(self, vm: BuildVm, *, build_id: str, secret: bytes) -> AbstractAsyncContextManager[GuestSession]:
        """A session to ``vm``, logged in with the credentials derived from ``secret`` for ``build_id``."""


@dataclass(frozen=True)
class Deprovision:
    """The generalize step AIB appends after the customizers: its default command, or the override file.

    ``default_written_first``: AIB writes its default script to the override path before the customizers run
    (Windows), so a customizer may edit it in place. ``time_limit``: seconds the step may run before it fails
    (sysprep can wait forever for a state it never reaches); ``stuck`` says, from the end of its output, where it
    stuck.
    """

    override_path: str
    override_command: str
    provisioner: str  # the Packer provisioner AIB runs it through: shell or powershell
    default_written_first: bool = False
    time_limit: float | None = None
    stuck: Callable[[str], str] | None = None


@dataclass(frozen=True)
class FileSource:
    """A File customizer's staged source: its content read through the worker, or a URL the guest can fetch it
    from itself (a short-lived read URL of the staged copy)."""

    size: int
    sha256: str
    read: Callable[[], Awaitable[bytes]]
    url: Callable[[], Awaitable[str]]


class OsProfile(Protocol):
    """One guest OS as AIB treats it: the steps it runs, where files may go, how it is generalized."""

    os_type: str
    transport: Transport
    deprovision: Deprovision
    # Seconds between two reads of a running script's output.
    poll_every: float

    def template_issues(self, template: ImageTemplate) -> list[TemplateIssue]:
        """What AIB refuses only once it knows the source's OS: a step this OS cannot run, a File destination
        it does not allow. Checked when the source is resolved, before anything is made."""

    def script_for(self, step: GuestStep, staged: bytes | None) -> str:
        """The script a Shell or PowerShell step runs: its inline lines, or its staged scriptUri file."""

    async def prepare(self, guest: GuestSession) -> None:
        """What AIB puts into a build VM before its first customizer runs (on Windows, its deprovisioning script)."""

    async def copy_file(self, guest: GuestSession, destination: str, source: FileSource) -> None:
        """A File customizer: put ``source`` at ``destination``, pushed by the worker or fetched by the guest."""

    async def run_step(self, request: GuestScriptRequest, guest: GuestSession, log: LogSink) -> GuestScriptResult:
        """A step of this OS's own, which is no single script (Windows' restarts and updates)."""

    async def default_deprovision(self, guest: GuestSession, vm: BuildVm) -> str:
        """AIB's default generalize command for this OS, as it applies to this guest."""
