"""Builds against the recording cloud on a real dev server: a worker per test, on its own task queue."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from tests.fixtures.recording_cloud import RecordingCloud
from worker import run_worker
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildStatus, RunState

SCRIPT = b"#!/bin/sh\necho configured > /tmp/configured\n"


def linux_template(artifacts: Path, **properties: Any) -> dict[str, Any]:
    """A template using every Linux step: inline and scriptUri Shell, File, a validator, three targets."""
    script = artifacts / "configure.sh"
    script.write_bytes(SCRIPT)
    page = artifacts / "index.html"
    page.write_text("<h1>golden</h1>")
    sub = "/subscriptions/0000/resourceGroups/images/providers/Microsoft.Compute"
    template = {
        "location": "westeurope",
        "properties": {
            "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"},
            "customize": [
                {"type": "Shell", "name": "packages", "inline": ["sudo apt-get install -y tree"]},
                {
                    "type": "Shell",
                    "name": "configure",
                    "scriptUri": script.as_uri(),
                    "sha256Checksum": hashlib.sha256(SCRIPT).hexdigest(),
                },
                {"type": "File", "name": "page", "sourceUri": page.as_uri(), "destination": "/tmp/index.html"},
            ],
            "validate": {"inVMValidations": [{"type": "Shell", "name": "check", "inline": ["test -f /tmp/configured"]}]},
            "distribute": [
                {"type": "ManagedImage", "runOutputName": "managed", "imageId": f"{sub}/images/golden", "location": "westeurope"},
                {
                    "type": "SharedImage",
                    "runOutputName": "gallery",
                    "galleryImageId": f"{sub}/galleries/kiln/images/debian",
                    "targetRegions": [{"name": "westeurope"}, {"name": "northeurope", "replicaCount": 2}],
                },
                {"type": "VHD", "runOutputName": "vhd"},
            ],
        },
    }
    template = copy.deepcopy(template)
    template["properties"].update(properties)
    return template


@dataclass
class Harness:
    client: Client
    cloud: RecordingCloud
    task_queue: str
    artifacts: Path

    def template(self, **properties: Any) -> dict[str, Any]:
        return linux_template(self.artifacts, **properties)

    async def start(self, template: dict[str, Any], *, name: str | None = None) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            ImageBuildWorkflow.run,
            template,
            id=name or f"build-{uuid.uuid4().hex[:8]}",
            task_queue=self.task_queue,
        )

    async def finish(self, handle: WorkflowHandle[Any, Any]) -> BuildStatus:
        """Wait for the build to end, whatever its outcome, and return its final status."""
        try:
            await handle.result()
        except WorkflowFailureError:
            pass
        return await handle.query(ImageBuildWorkflow.status)

    async def wait_for_step(self, handle: WorkflowHandle[Any, Any], prefix: str, timeout: float = 60) -> BuildStatus:
        """Wait until a step whose name starts with ``prefix`` is running."""
        async with asyncio.timeout(timeout):
            while True:
                status = await handle.query(ImageBuildWorkflow.status)
                if any(s.name.startswith(prefix) and s.outcome == "running" for s in status.steps):
                    return status
                if status.run_state != RunState.RUNNING:
                    raise AssertionError(f"build ended ({status.run_state}: {status.message}) before {prefix!r} ran")
                await asyncio.sleep(0.2)


@pytest_asyncio.fixture
async def harness(client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    cloud = RecordingCloud(tmp_path / "cloud.db")
    task_queue = f"kiln-test-{uuid.uuid4()}"
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(client, cloud, task_queue=task_queue, stop=stop))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    yield Harness(client, cloud, task_queue, artifacts)
    stop.set()
    await worker
