"""What the worker's environment sets for Windows guests: certificate checks off only where the user asks
(``KILN_WINRM_INSECURE=1``), and the bound on restarts per step (``KILN_WINDOWS_MAX_RESTARTS``, default 10)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from activities.clouds.base import PermanentError
from activities.guest.keys import windows_password
from activities.guest.windows import WindowsProfile
from tests.services import free_loopback_address
from tests.wsman import MachineSettings, WindowsMachine
from tests.wsman.machine import WINRM_HTTPS_PORT
from workflows.models import BuildVm

SECRET, BUILD_ID = os.urandom(32), "build-settings-1"


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[WindowsMachine]:
    """A machine whose admin password is the one kiln derives for the build, as the cloud made it."""
    made = WindowsMachine(
        computer_name="kilnwin02",
        admin_user=f"kilnadmin{tmp_path.name[-6:]}",
        admin_password=windows_password(SECRET, BUILD_ID),
        host=free_loopback_address(WINRM_HTTPS_PORT),
        folder=tmp_path / "machine",
        settings=MachineSettings(),
    )
    made.enable_winrm()
    yield made
    made.delete()


def build_vm(machine: WindowsMachine, host_key: str) -> BuildVm:
    return BuildVm(
        name="win-build",
        host=machine.host,
        port=machine.port,
        admin_user=machine.admin_user,
        host_key=host_key,
        os_type="Windows",
    )


async def echo(profile: WindowsProfile, vm: BuildVm) -> bytes:
    async with profile.transport.session(vm, build_id=BUILD_ID, secret=SECRET) as session:
        return (await session.run("echo reached")).stdout


async def test_a_vm_without_a_pinned_certificate_is_refused_unless_the_user_asks(
    machine: WindowsMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    unpinned = build_vm(machine, host_key="")
    for setting in (None, "0"):
        if setting is None:
            monkeypatch.delenv("KILN_WINRM_INSECURE", raising=False)
        else:
            monkeypatch.setenv("KILN_WINRM_INSECURE", setting)
        with pytest.raises(PermanentError) as refused:
            await echo(WindowsProfile.from_environment(), unpinned)
        assert refused.value.type == "HostKeyMissing"
        assert "VM win-build has no pinned WinRM certificate" in refused.value.message
        assert "set KILN_WINRM_INSECURE=1" in refused.value.message
    assert machine.endpoint is not None and machine.endpoint.request_times == []  # no request reached it

    monkeypatch.setenv("KILN_WINRM_INSECURE", "1")
    assert await echo(WindowsProfile.from_environment(), unpinned) == b"reached\r\n"  # a self-signed certificate


async def test_asking_for_no_check_still_checks_a_pinned_certificate(
    machine: WindowsMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_WINRM_INSECURE", "1")
    profile = WindowsProfile.from_environment()
    assert machine.endpoint is not None
    pinned = build_vm(machine, host_key=f"winrm-sha1:{machine.endpoint.certificate.thumbprint}")
    assert await echo(profile, pinned) == b"reached\r\n"
    with pytest.raises(PermanentError) as refused:
        await echo(profile, build_vm(machine, host_key="winrm-sha1:" + "00" * 20))
    assert refused.value.type == "HostKeyMismatch"


def test_the_restart_bound_is_10_unless_kiln_windows_max_restarts_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_WINDOWS_MAX_RESTARTS", raising=False)
    assert WindowsProfile.from_environment().max_restarts == 10
    monkeypatch.setenv("KILN_WINDOWS_MAX_RESTARTS", "")
    assert WindowsProfile.from_environment().max_restarts == 10
    monkeypatch.setenv("KILN_WINDOWS_MAX_RESTARTS", "25")
    assert WindowsProfile.from_environment().max_restarts == 25


@pytest.mark.parametrize(
    ("variable", "value", "explained"),
    [
        ("KILN_WINDOWS_MAX_RESTARTS", "ten", "a whole number of restarts, 1 or more (default 10), not 'ten'"),
        ("KILN_WINDOWS_MAX_RESTARTS", "0", "1 or more (default 10), not '0'"),
        ("KILN_WINDOWS_MAX_RESTARTS", "-3", "1 or more (default 10), not '-3'"),
        ("KILN_WINRM_INSECURE", "true", "must be 1 (accept a WinRM certificate kiln could not pin) or 0, not 'true'"),
    ],
)
def test_a_setting_the_worker_cannot_use_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, explained: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as refused:
        WindowsProfile.from_environment()
    assert str(refused.value).startswith(variable) and explained in str(refused.value)
