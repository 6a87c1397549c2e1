"""A scripted Windows machine per test, its WinRM listener on a loopback address of its own, and kiln's WinRM
client and session logged in to it as its admin, with the listener certificate pinned."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from activities.guest.windows_session import WindowsSession
from activities.guest.winrm import WinRmClient, WinRmSettings
from tests.services import free_loopback_address
from tests.wsman import MachineSettings, WindowsMachine
from tests.wsman.machine import WINRM_HTTPS_PORT

ADMIN, PASSWORD = "kilnadmin", "Kn1!test-password"
# Short enough that a test of a command past its deadline takes a second, not minutes.
SETTINGS = WinRmSettings(operation_timeout=1, read_timeout=3, command_timeout=10)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[WindowsMachine]:
    made = WindowsMachine(
        computer_name="kilnwin01",
        admin_user=f"{ADMIN}{tmp_path.name[-6:]}",
        admin_password=PASSWORD,
        host=free_loopback_address(WINRM_HTTPS_PORT),
        folder=tmp_path / "machine",
        settings=MachineSettings(),
    )
    made.enable_winrm()
    yield made
    made.delete()


def client_for(machine: WindowsMachine, **changes: object) -> WinRmClient:
    assert machine.endpoint is not None
    options: dict = {
        "host": machine.host,
        "port": machine.port,
        "username": machine.admin_user,
        "password": PASSWORD,
        "thumbprint": machine.endpoint.certificate.thumbprint,
        "settings": SETTINGS,
    }
    options.update(changes)
    return WinRmClient(**options)


@pytest_asyncio.fixture
async def client(machine: WindowsMachine) -> AsyncIterator[WinRmClient]:
    made = client_for(machine)
    yield made
    made.close()


@pytest.fixture
def session(machine: WindowsMachine, client: WinRmClient) -> WindowsSession:
    return WindowsSession(client, username=machine.admin_user, password=PASSWORD)
