"""One real build on Azure across three regions, under the shipped role only, leaving nothing of kiln's behind; its
ARM traffic is recorded for the recorded-traffic check (``tests/azure_live/recording.py``).

Skipped unless these are set (and ``DefaultAzureCredential`` finds credentials):

* ``AZURE_SUBSCRIPTION_ID``;
* ``KILN_LIVE_GALLERY_IMAGE_ID``: an existing Gen2 Linux image definition, in a gallery whose region is not the
  build's.

Optional: ``KILN_LIVE_LOCATION`` (the build's region, default westeurope), ``KILN_LIVE_IMAGE_LOCATION`` (the
managed image's, a third region, default northeurope), ``KILN_LIVE_IMAGE_GROUP`` (the managed image's resource
group, default the gallery's), ``KILN_LIVE_RECORDING`` (where the recording goes, default a temporary file whose
path is printed), and the worker's own settings (``KILN_LOG_ACCOUNT`` and the rest, see
``activities/clouds/azure/__init__.py``). The identity must hold ``deploy/azure-role.json`` and nothing more,
which the test checks before it builds.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.core.rest import HttpRequest
from temporalio.client import Client, WorkflowFailureError

from activities.clouds.aib.ids import parse_gallery_id, region_key
from activities.clouds.azure import AzureCloud
from tests.arm_emulator.rbac import Role
from tests.azure_live.live_build import leftovers, live_template
from tests.azure_live.recording import Recorder
from worker import run_worker
from workflows.build import ImageBuildWorkflow
from workflows.models import RunState

SHIPPED_ROLE = Path(__file__).parents[2] / "deploy" / "azure-role.json"

pytestmark = [
    pytest.mark.azure_live,
    pytest.mark.timeout(3 * 3600),
    pytest.mark.skipif(
        not (os.environ.get("AZURE_SUBSCRIPTION_ID") and os.environ.get("KILN_LIVE_GALLERY_IMAGE_ID")),
        reason="needs AZURE_SUBSCRIPTION_ID, Azure credentials and KILN_LIVE_GALLERY_IMAGE_ID",
    ),
]


async def granted_beyond_the_shipped_role(cloud: AzureCloud, scopes: list[str]) -> list[str]:
    """The actions the identity holds on ``scopes`` that the shipped role does not grant."""
    shipped = Role.from_file(SHIPPED_ROLE)
    extra: set[str] = set()
    for scope in scopes:
        answer = await cloud.arm.resource.send_request(
            HttpRequest("GET", f"{scope}/providers/Microsoft.Authorization/permissions?api-version=2022-04-01")
        )
        answer.raise_for_status()
        for permission in answer.json()["value"]:
            extra |= {action for action in permission.get("actions") or [] if not shipped.allows(action)}
    return sorted(extra)


async def test_a_build_across_three_regions_under_the_shipped_role_leaves_nothing(
    client: Client, tmp_path: Path
) -> None:
    location = os.environ.get("KILN_LIVE_LOCATION", "westeurope")
    image_location = os.environ.get("KILN_LIVE_IMAGE_LOCATION", "northeurope")
    definition_id = os.environ["KILN_LIVE_GALLERY_IMAGE_ID"]
    ref = parse_gallery_id(definition_id)
    assert ref is not None and ref.image is not None, f"KILN_LIVE_GALLERY_IMAGE_ID {definition_id} is no definition"
    recording = Path(os.environ.get("KILN_LIVE_RECORDING") or tmp_path / "live.jsonl")
    cloud = AzureCloud.from_environment(client_options={"per_retry_policies": [Recorder(recording)]})
    image_group = os.environ.get("KILN_LIVE_IMAGE_GROUP", ref.group)
    image_id = (
        f"/subscriptions/{cloud.subscription_id}/resourceGroups/{image_group}/providers/Microsoft.Compute/images/"
        f"kiln-live-{uuid.uuid4().hex[:8]}"
    )
    task_queue = f"kiln-azure-live-{uuid.uuid4()}"
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(client, cloud, task_queue=task_queue, stop=stop))
    status = None
    try:
        definition = await cloud.arm.compute.gallery_images.get(ref.group, ref.gallery, ref.image)
        gallery_region = definition.location
        regions = {region_key(r) for r in (location, gallery_region, image_location)}
        assert len(regions) == 3, (
            f"the build ({location}), gallery ({gallery_region}) and image ({image_location}) must be in three "
            "regions: set KILN_LIVE_LOCATION and KILN_LIVE_IMAGE_LOCATION"
        )
        subscription = f"/subscriptions/{cloud.subscription_id}"
        extra = await granted_beyond_the_shipped_role(
            cloud, [subscription, f"{subscription}/resourceGroups/{ref.group}"]
        )
        assert extra == [], f"the identity holds more than deploy/azure-role.json: {extra}"

        template = live_template(
            location=location,
            gallery_image_id=definition_id,
            gallery_region=gallery_region,
            image_id=image_id,
            image_location=image_location,
        )
        handle = await client.start_workflow(
            ImageBuildWorkflow.run, template, id=f"live-{uuid.uuid4().hex[:8]}", task_queue=task_queue
        )
        try:
            await handle.result()
        except WorkflowFailureError:
            pass
        status = await handle.query(ImageBuildWorkflow.status)
        assert status.run_state == RunState.SUCCEEDED, status.message
        [gallery] = [o for o in status.run_outputs if o.type == "SharedImage"]
        assert {region_key(r) for r in gallery.replication} == {region_key(location), region_key(gallery_region)}
        assert set(gallery.replication.values()) == {"Completed"}
        made = await cloud.arm.compute.images.get(image_group, image_id.rsplit("/", 1)[1])
        assert region_key(made.location) == region_key(image_location)
        assert await leftovers(cloud, status, logs_kept=not os.environ.get("KILN_LOG_ACCOUNT")) == []
    finally:
        print(f"ARM traffic recorded in {recording}")
        try:
            if status is not None:
                for output in status.run_outputs:
                    version = parse_gallery_id(output.artifact_id) if output.type == "SharedImage" else None
                    if version is not None and version.version:
                        await (
                            await cloud.arm.compute.gallery_image_versions.begin_delete(
                                version.group, version.gallery, version.image, version.version
                            )
                        ).result()
                try:
                    await (
                        await cloud.arm.compute.images.begin_delete(image_group, image_id.rsplit("/", 1)[1])
                    ).result()
                except ResourceNotFoundError:
                    pass
        finally:
            stop.set()
            await worker
            await cloud.close()
