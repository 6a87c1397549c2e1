"""A build started with the plain Temporal CLI, as an AIB user would with nothing but a template file."""

from __future__ import annotations

import asyncio
import json
import uuid

from temporalio.client import Client

from tests.services import temporal_cli
from tests.workflows.harness import Harness
from workflows.build import ImageBuildWorkflow
from workflows.models import RunState


async def test_temporal_cli_start_with_the_template_file_as_input(harness: Harness, client: Client) -> None:
    template = harness.artifacts / "template.json"
    template.write_text(json.dumps(harness.template()))
    name = f"cli-{uuid.uuid4().hex[:8]}"

    process = await asyncio.create_subprocess_exec(
        temporal_cli(),
        "workflow",
        "start",
        "--address",
        client.service_client.config.target_host,
        "--type",
        "ImageBuild",
        "--task-queue",
        harness.task_queue,
        "--workflow-id",
        name,
        "--input-file",
        str(template),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()

    status = await harness.finish(client.get_workflow_handle(name))
    assert status.run_state == RunState.SUCCEEDED, status.message
    assert status.template_name == name
    assert len(status.run_outputs) == 3
    assert harness.cloud.alive() == []
    assert await client.get_workflow_handle(name).query(ImageBuildWorkflow.status) == status
