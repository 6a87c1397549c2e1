"""The guest seam: everything that happens inside a build VM, whatever cloud made it.

An OS profile per guest OS (``linux``, ``windows``) owns the transport (SSH, WinRM), how a step's script is
made, AIB's default generalize step and its override file, and the rules AIB applies once it knows the source's
OS. A cloud supplies only where its VM answers (``BuildVm``) and the worker secret the VM's credentials derive
from (``keys``); ``Guests.connect`` picks the profile by the VM's OS type.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager

from activities.clouds.base import PermanentError
from activities.guest.base import Deprovision, FileSource, GuestSession, OsProfile, ScriptProgress, Transport
from activities.guest.linux import LinuxProfile
from activities.guest.windows import WindowsProfile
from workflows.models import BuildVm


class Guests:
    """The OS profiles a worker knows, by OS type. Tests swap in profiles with a transport of their own."""

    def __init__(self, profiles: Iterable[OsProfile] | None = None) -> None:
        chosen = list(profiles) if profiles is not None else [LinuxProfile(), WindowsProfile.from_environment()]
        self._profiles = {profile.os_type: profile for profile in chosen}

    def profile(self, os_type: str) -> OsProfile:
        """The profile of ``os_type``.

        Raises:
            PermanentError: no profile handles that OS.
        """
        try:
            return self._profiles[os_type]
        except KeyError:
            raise PermanentError(f"kiln has no guest profile for {os_type} VMs", kind="UnsupportedOsType") from None

    def connect(self, vm: BuildVm, *, build_id: str, secret: bytes) -> AbstractAsyncContextManager[GuestSession]:
        """A session to ``vm`` through its OS's transport, logged in with the credentials derived from ``secret``."""
        return self.profile(vm.os_type).transport.session(vm, build_id=build_id, secret=secret)


__all__ = ["Deprovision", "FileSource", "GuestSession", "Guests", "OsProfile", "ScriptProgress", "Transport"]
