"""What a worker tells its operators: Prometheus metrics scraped while a build runs, one build's trace across
its workflow and activities, and JSON log lines that carry the build's id."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from pathlib import Path

import aiohttp
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.connection import connect
from activities.telemetry import JsonLines, metrics_runtime, tracing_interceptor
from tests.services import free_port
from tests.workflows.harness import serving
from worker import WorkerTuning
from workflows.metrics import step_kind
from workflows.models import RunState

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of the samples named ``name`` whose labels include ``labels``, from a Prometheus scrape."""
    found = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match is None or match["name"] != name:
            continue
        have = dict(LABEL.findall(match["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(match["value"]))
    return found


async def scrape(address: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://{address}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_the_metrics_endpoint_shows_the_sdks_and_kilns_metrics_during_and_after_a_build(
    client: Client, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    metered = await connect(address=client.service_client.config.target_host, runtime=metrics_runtime(address))
    tuning = WorkerTuning(max_concurrent_activities=7)
    async with serving(metered, tmp_path, tuning=tuning) as harness:
        queue = harness.task_queue
        harness.cloud.SLOW_SECONDS = 3
        harness.cloud.inject("customize", "slow", times=1)
        harness.cloud.inject("delete_vm", "transient", times=1)
        handle = await harness.start(harness.template())
        await harness.wait_for_step(handle, "customize")

        during = await scrape(address)
        assert samples(during, "kiln_builds", run_state="Running", cloud=queue) == [1]
        assert samples(during, "kiln_builds", run_state="Succeeded", cloud=queue) == []
        # The worker's tuning holds: of its 7 activity slots, the running customizer takes one.
        assert samples(
            during, "temporal_worker_task_slots_available", task_queue=queue, worker_type="ActivityWorker"
        ) == [6]
        assert samples(during, "kiln_step_duration_count", step_kind="resolve source", outcome="succeeded")

        assert (await harness.finish(handle)).run_state == RunState.SUCCEEDED
        harness.cloud.inject("delete_image", "fatal")
        left = await harness.finish(await harness.start(harness.template()))
        assert left.run_state == RunState.SUCCEEDED and left.pending_cleanup

        after = await scrape(address)
    assert samples(after, "kiln_builds", run_state="Succeeded", cloud=queue) == [2]
    customize = samples(after, "kiln_step_duration_sum", step_kind="customize", outcome="succeeded", cloud=queue)
    assert customize and customize[0] >= 3  # the slow script's 3 s, in seconds
    # Two builds, each with a build VM and a validation VM, all deleted; the second build's snapshot is left.
    assert samples(after, "kiln_resources_created", kind="virtualMachine", cloud=queue) == [4]
    assert samples(after, "kiln_resources_deleted", kind="virtualMachine", cloud=queue) == [4]
    assert samples(after, "kiln_resources_created", kind="snapshot", cloud=queue) == [2]
    assert samples(after, "kiln_resources_deleted", kind="snapshot", cloud=queue) == [1]
    assert samples(after, "kiln_cleanup_retries", undo="delete_vm") == [1]
    assert samples(after, "kiln_undos_left", cloud=queue) == [1]
    assert samples(after, "temporal_workflow_completed", task_queue=queue, workflow_type="ImageBuild") == [2]


async def test_one_build_is_one_trace_across_its_workflow_and_activities(client: Client, tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    traced = await connect(
        address=client.service_client.config.target_host, interceptors=[tracing_interceptor(None, exporter=spans)]
    )
    async with serving(traced, tmp_path) as harness:
        name = f"traced-{uuid.uuid4().hex[:8]}"
        status = await harness.finish(await harness.start(harness.template(), name=name))
    assert status.run_state == RunState.SUCCEEDED
    finished = spans.get_finished_spans()
    start = next(s for s in finished if s.name == "StartWorkflow:ImageBuild")
    trace = [s for s in finished if s.context.trace_id == start.context.trace_id]
    names = {s.name for s in trace}
    assert {"RunWorkflow:ImageBuild", "RunActivity:resolve_source", "RunActivity:create_vm"} <= names
    assert {"StartActivity:run_customizer", "RunActivity:capture_image", "RunActivity:delete_staging"} <= names
    assert all(s.attributes.get("temporalWorkflowID") == name for s in trace if s.name.startswith("RunActivity"))


async def test_json_log_lines_carry_the_build_id(client: Client, tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    logging.getLogger().addHandler(handler)
    try:
        async with serving(client, tmp_path) as harness:
            harness.cloud.inject("delete_image", "fatal")
            name = f"logged-{uuid.uuid4().hex[:8]}"
            await harness.finish(await harness.start(harness.template(), name=name))

        async def in_an_activity() -> None:
            logging.getLogger("kiln.azure").warning("a line of the cloud's own, written during a step")

        await ActivityEnvironment().run(in_an_activity)  # its build: ActivityEnvironment's workflow id
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    left = [line for line in lines if "left for the janitor" in line["message"]]
    assert left and all(line["build_id"] == name and line["level"] == "WARNING" for line in left)
    cloud_line = next(line for line in lines if line["logger"] == "kiln.azure")
    assert cloud_line["build_id"] == "test"


def test_step_kinds_are_few() -> None:
    assert step_kind("customize 2/4: harden the ssh daemon") == "customize"
    assert step_kind("validate 1/1: check") == "validate"
    assert step_kind("distribute SharedImage gallery-westeurope") == "distribute SharedImage"
    assert step_kind("create build VM") == "create build VM"
