"""Fixtures for the Azure cloud against the ARM emulator, Azurite and real SSH guests (see ``environment.py``)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from activities.clouds.azure import AzureCloud
from activities.clouds.local import azurite as local_azurite
from tests.arm_emulator import ArmEmulator
from tests.azure.environment import AzureHarness, Guests, guests_supported, make_arm, make_cloud


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[Guests]:
    # Sync: Guests serves the emulator's thread with event loops of its own.
    if not asyncio.run(guests_supported(tmp_path)):
        pytest.skip("real SSH guests need root and overlayfs over /")
    guests = Guests(tmp_path / "guests", os.urandom(32))
    yield guests
    guests.close()


@pytest_asyncio.fixture
async def directory(tmp_path: Path) -> Path:
    """A test's folder, for a test that makes real guests of its own."""
    if not await guests_supported(tmp_path):
        pytest.skip("real SSH guests need root and overlayfs over /")
    return tmp_path


@pytest.fixture
def blob_account(azurite: local_azurite.Azurite) -> str:  # noqa: F811
    return local_azurite.account_url(local_azurite.STAGING_ACCOUNT, base=azurite.endpoint)


@pytest.fixture
def arm(blob_account: str) -> Iterator[ArmEmulator]:
    with make_arm(blob_account) as emulator:
        yield emulator


@pytest_asyncio.fixture
async def cloud(arm: ArmEmulator, blob_account: str) -> AsyncIterator[AzureCloud]:
    made = make_cloud(arm.base_url, blob_account, secret=os.urandom(32))
    yield made
    await made.close()


@pytest_asyncio.fixture
async def harness(
    client: Client, arm: ArmEmulator, blob_account: str, guests: Guests, tmp_path: Path
) -> AsyncIterator[AzureHarness]:
    guests.attach(arm)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    harness = AzureHarness(client, arm, blob_account, os.urandom(32), f"kiln-azure-test-{uuid.uuid4()}", artifacts, [])
    harness.start_worker()
    yield harness
    await harness.stop_workers()
