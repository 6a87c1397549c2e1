"""What a build step needs of a guest, whatever its OS: a session that runs detached scripts, and the OS's rules.

A session is opened by the guest's OS profile (SSH for Linux, WinRM for Windows) from what the cloud supplies:
the VM's endpoint in ``BuildVm`` and the worker secret its credentials derive from. Everything that depends on
the OS, and nothing that depends on the cloud, lives behind ``OsProfile``.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from workflows.models import BuildVm, GuestStep
from workflows.template import ImageTemplate, TemplateIssue


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
        self, run_id: str, script: str, *, as_root: bool = False, environment: dict[str, str] | None = None
    ) -> None:
        """Start ``script`` under ``run_id``, with ``environment`` added to its own; does nothing if that run has
        already started. The script is run as a file, by its own ``#!`` line, or by ``/bin/sh`` when it has none."""

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
    """The generalize step AIB appends after the customizers: its default command, or the override file."""

    override_path: str
    override_command: str
    provisioner: str  # the Packer provisioner AIB runs it through: shell or powershell


class OsProfile(Protocol):
    """One guest OS as AIB treats it: the steps it runs, where files may go, how it is generalized."""

    os_type: str
    transport: Transport
    deprovision: Deprovision

    def template_issues(self, template: ImageTemplate) -> list[TemplateIssue]:
        """What AIB refuses only once it knows the source's OS: a step this OS cannot run, a File destination
        it does not allow. Checked when the source is resolved, before anything is made."""

    def script_for(self, step: GuestStep, staged: bytes | None) -> str:
        """The script a Shell or PowerShell step runs: its inline lines, or its staged scriptUri file."""

    async def default_deprovision(self, guest: GuestSession, vm: BuildVm) -> str:
        """AIB's default generalize command for this OS, as it applies to this guest."""
