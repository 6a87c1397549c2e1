"""One real build on Azure: a small Linux image into a gallery in one region, then nothing of kiln's left.

Skipped unless AZURE_SUBSCRIPTION_ID and credentials (DefaultAzureCredential) are present, and
KILN_LIVE_GALLERY_IMAGE_ID names an existing Gen2 Linux image definition (its gallery's region is the build's).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from temporalio.client import Client, WorkflowFailureError

from activities.clouds.azure import AzureCloud
from worker import run_worker
from workflows.build import ImageBuildWorkflow
from workflows.models import RunState

pytestmark = [
    pytest.mark.azure_live,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        not (os.environ.get("AZURE_SUBSCRIPTION_ID") and os.environ.get("KILN_LIVE_GALLERY_IMAGE_ID")),
        reason="needs AZURE_SUBSCRIPTION_ID, Azure credentials and KILN_LIVE_GALLERY_IMAGE_ID",
    ),
]


async def test_live_gallery_build_leaves_nothing(client: Client) -> None:
    location = os.environ.get("KILN_LIVE_LOCATION", "westeurope")
    template = {
        "location": location,
        "properties": {
            "source": {
                "type": "PlatformImage",
                "publisher": "Canonical",
                "offer": "0001-com-ubuntu-server-jammy",
                "sku": "22_04-lts-gen2",
                "version": "latest",
            },
            "customize": [{"type": "Shell", "name": "hello", "inline": ["echo built by kiln | sudo tee /etc/kiln"]}],
            "distribute": [
                {
                    "type": "SharedImage",
                    "runOutputName": "live",
                    "galleryImageId": os.environ["KILN_LIVE_GALLERY_IMAGE_ID"],
                    "targetRegions": [{"name": location}],
                }
            ],
        },
    }
    cloud = AzureCloud.from_environment()
    task_queue = f"kiln-azure-live-{uuid.uuid4()}"
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(client, cloud, task_queue=task_queue, stop=stop))
    try:
        handle = await client.start_workflow(
            ImageBuildWorkflow.run, template, id=f"live-{uuid.uuid4().hex[:8]}", task_queue=task_queue
        )
        try:
            await handle.result()
        except WorkflowFailureError:
            pass
        status = await handle.query(ImageBuildWorkflow.status)
        assert status.run_state == RunState.SUCCEEDED, status.message
        left = [
            r.id
            async for r in cloud.arm.resource.resources.list(
                filter=f"tagName eq 'kilnBuildId' and tagValue eq '{status.build_id}'"
            )
            if (r.tags or {}).get("kilnRole") == "temporary"
        ]
        assert left == []
        output = status.run_outputs[0]
        version = output.artifact_id.rsplit("/", 1)[1]
        definition = os.environ["KILN_LIVE_GALLERY_IMAGE_ID"].split("/")
        await (
            await cloud.arm.compute.gallery_image_versions.begin_delete(
                definition[4], definition[8], definition[10], version
            )
        ).result()
    finally:
        stop.set()
        await worker
        await cloud.close()
