"""A real Azurite for the tests: one per session, on a free loopback port, its data in a temp folder.

The root conftest loads these fixtures for every test folder.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from activities.clouds.local.azurite import Azurite, start_azurite
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.storage import LocalStorage
from tests.services import free_port

PROJECT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(scope="session")
async def azurite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Azurite]:
    server = await start_azurite(location=tmp_path_factory.mktemp("azurite"), port=free_port())
    before = os.environ.get("KILN_AZURITE_ENDPOINT")
    os.environ["KILN_AZURITE_ENDPOINT"] = server.endpoint  # code that finds Azurite by itself finds this one
    try:
        yield server
    finally:
        if before is None:
            os.environ.pop("KILN_AZURITE_ENDPOINT", None)
        else:
            os.environ["KILN_AZURITE_ENDPOINT"] = before
        await server.stop()


@pytest_asyncio.fixture
async def local_storage(
    azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LocalStorage]:
    """A LocalStorage with its own state folder (resource store, image cache) on the session's Azurite."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "state"))
    async with LocalStorage(
        store=ResourceStore(tmp_path / "state" / "resources.db"), endpoint=azurite.endpoint
    ) as storage:
        yield storage
