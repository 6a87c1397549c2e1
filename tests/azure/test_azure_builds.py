"""Whole builds on the Azure cloud: the corpus's Linux templates through a real worker, the ImageBuild workflow,
the ARM emulator (real SDK clients), Azurite and real SSH guests; then the faults that matter most."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from activities.clouds.azure import AzureCloud
from tests.azure.conftest import LOCATION, SUB, Guests, ImageArm, make_cloud
from worker import run_worker
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildStatus, RunState

CORPUS = Path(os.environ.get("KILN_AIB_CORPUS", "/work/shared/aib-corpus"))
REGION2 = "westus2"
RG = "aibImageRG"
GALLERY = "kilnGallery"
SCRIPT = b"#!/bin/sh\necho customized by $(id -un) > /tmp/customized\n"


@dataclass
class AzureHarness:
    client: Client
    arm: ImageArm
    blob_account: str
    secret: bytes
    task_queue: str
    artifacts: Path
    workers: list[tuple[asyncio.Event, asyncio.Task[None], AzureCloud]]

    def start_worker(self) -> AzureCloud:
        cloud = make_cloud(self.arm, self.blob_account, secret=self.secret)
        stop = asyncio.Event()
        task = asyncio.create_task(run_worker(self.client, cloud, task_queue=self.task_queue, stop=stop))
        self.workers.append((stop, task, cloud))
        return cloud

    async def stop_worker(self, index: int) -> None:
        stop, task, cloud = self.workers[index]
        stop.set()
        await task
        await cloud.close()

    async def start(self, template: dict[str, Any], name: str) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            ImageBuildWorkflow.run, template, id=f"{name}-{uuid.uuid4().hex[:6]}", task_queue=self.task_queue
        )

    async def finish(self, handle: WorkflowHandle[Any, Any]) -> BuildStatus:
        try:
            await handle.result()
        except WorkflowFailureError:
            pass
        return await handle.query(ImageBuildWorkflow.status)

    async def wait_for_step(self, handle: WorkflowHandle[Any, Any], prefix: str, timeout: float = 120) -> BuildStatus:
        async with asyncio.timeout(timeout):
            while True:
                status = await handle.query(ImageBuildWorkflow.status)
                if any(s.name.startswith(prefix) and s.outcome == "running" for s in status.steps):
                    return status
                if status.run_state != RunState.RUNNING:
                    raise AssertionError(f"build ended ({status.run_state}: {status.message}) before {prefix!r}")
                await asyncio.sleep(0.2)

    def corpus(self, name: str, **extra: str) -> dict[str, Any]:
        """A corpus template with its <placeholders> set to emulator values and its artifacts made local."""
        values = {
            "region": LOCATION, "region1": LOCATION, "region2": REGION2, "subscriptionID": SUB, "rgName": RG,
            "resourceGroupName": RG, "imageName": "goldenImage", "runOutputName": "output",
            "sharedImageGalName": GALLERY, "acgName": GALLERY, "imageDefName": "ubuntu",
            "imgBuilderId": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ManagedIdentity/"
                            "userAssignedIdentities/aibIdentity",
            "vnetRgName": "vnetRG", "vnetName": "buildVnet", "subnetName": "buildSubnet",
            "srcImageName": "sourceImage", "scriptName": "validate script",
            "sigDefImgVersionId": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/galleries/"
                                  f"{GALLERY}/images/source/versions/latest",
            **extra,
        }
        text = (CORPUS / name).read_text()
        for key, value in values.items():
            text = text.replace(f"<{key}>", value)
        return self._local_artifacts(json.loads(text))

    def _local_artifacts(self, node: Any) -> Any:
        """Remote scriptUri/sourceUri become files here (there is no internet), checksums updated to match."""
        if isinstance(node, list):
            return [self._local_artifacts(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: self._local_artifacts(v) for k, v in node.items()}
        for key in ("scriptUri", "sourceUri"):
            uri = node.get(key)
            if isinstance(uri, str) and not uri.startswith("file:"):
                data = SCRIPT if key == "scriptUri" else b"<h1>golden</h1>\n"
                path = self.artifacts / hashlib.sha256(uri.encode()).hexdigest()[:12]
                path.write_bytes(data)
                node[key] = path.as_uri()
                if node.get("sha256Checksum"):
                    node["sha256Checksum"] = hashlib.sha256(data).hexdigest()
        return node


@pytest_asyncio.fixture
async def harness(
    client: Client, arm: ImageArm, blob_account: str, guests: Guests, tmp_path: Path
) -> AsyncIterator[AzureHarness]:
    arm.guest_factory = guests.boot
    arm.run_command = guests.run_command
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    harness = AzureHarness(client, arm, blob_account, os.urandom(32), f"kiln-azure-test-{uuid.uuid4()}", artifacts, [])
    harness.start_worker()
    yield harness
    for index, (stop, task, _) in enumerate(harness.workers):
        if not task.done():
            await harness.stop_worker(index)


async def prepare(cloud: AzureCloud, *, generation: str = "V1") -> None:
    """What the corpus templates expect to exist: the destination group, a gallery and its image definitions, a
    source image and version, and a VNet with a subnet."""
    resource, compute, network = cloud.arm.resource, cloud.arm.compute, cloud.arm.network
    for group in (RG, "vnetRG"):
        await resource.resource_groups.create_or_update(group, {"location": LOCATION})
    await (await compute.galleries.begin_create_or_update(RG, GALLERY, {"location": LOCATION})).result()
    for definition in ("ubuntu", "source"):
        await (await compute.gallery_images.begin_create_or_update(RG, GALLERY, definition, {
            "location": LOCATION,
            "properties": {"osType": "Linux", "osState": "Generalized", "hyperVGeneration": generation,
                           "identifier": {"publisher": "kiln", "offer": definition, "sku": generation}},
        })).result()
    image = await (await compute.images.begin_create_or_update(RG, "sourceImage", {
        "location": LOCATION,
        "properties": {"hyperVGeneration": generation, "storageProfile": {"osDisk": {
            "osType": "Linux", "osState": "Generalized", "blobUri": "https://src.blob.core.windows.net/vhds/a.vhd"}}},
    })).result()
    await (await compute.gallery_image_versions.begin_create_or_update(RG, GALLERY, "source", "1.0.0", {
        "location": LOCATION, "properties": {"storageProfile": {"source": {"id": image.id}}},
    })).result()
    await (await network.virtual_networks.begin_create_or_update("vnetRG", "buildVnet", {
        "location": LOCATION,
        "properties": {"addressSpace": {"addressPrefixes": ["10.1.0.0/16"]},
                       "subnets": [{"name": "buildSubnet", "properties": {"addressPrefix": "10.1.0.0/24"}}]},
    })).result()


def temporary(arm: ImageArm) -> list[dict[str, Any]]:
    return arm.resources({"kilnRole": "temporary"})


CORPUS_BUILDS = [
    ("q0_helloImageTemplateLinux.json", "V1"),
    ("q1_helloImageTemplateforSIG.json", "V2"),
    ("q1a_existingVNETLinux.json", "V1"),
    ("q2_helloImageTemplateforSIGfromSIG.json", "V1"),
    ("q3_helloImageTemplateforReCustomization.json", "V1"),
    ("q4_helloImageTemplateVHD.json", "V1"),
    ("q9trig_helloImageTemplate.json", "V1"),
    ("qvalL_validators_with_a_linux_image.json", "V1"),
]


@pytest.mark.parametrize(("name", "generation"), CORPUS_BUILDS)
async def test_corpus_build(harness: AzureHarness, name: str, generation: str) -> None:
    cloud = harness.workers[0][2]
    await prepare(cloud, generation=generation)
    template = harness.corpus(name)
    status = await harness.finish(await harness.start(template, name.split("_")[0]))
    assert status.run_state == RunState.SUCCEEDED, status.message
    distribute = template["properties"]["distribute"]
    assert len(status.run_outputs) == len(distribute)
    for output, target in zip(status.run_outputs, distribute, strict=True):
        assert output.provisioning_state == "Succeeded"
        if target["type"] == "ManagedImage":
            image = next(r for r in harness.arm.resources() if r["id"].lower() == target["imageId"].lower())
            assert image["tags"]["source"] == "azVmImageBuilder"
        elif target["type"] == "SharedImage":
            regions = {r if isinstance(r, str) else r["name"] for r in
                       target.get("replicationRegions") or target.get("targetRegions")}
            assert set(output.replication) == regions and set(output.replication.values()) == {"Completed"}
            assert any(r["id"] == output.artifact_id for r in harness.arm.resources())
        else:
            blob = cloud.blobs.blob(output.artifact_uri)
            assert (await blob.get_blob_properties()).size > 0
    assert temporary(harness.arm) == []
    log = await (await cloud.blobs.blob(status.log_uri).download_blob()).readall()
    assert b"deprovision" in log and b"exit code 0" in log


async def user_staging_group(cloud: AzureCloud) -> str:
    await cloud.arm.resource.resource_groups.create_or_update("userStaging", {"location": LOCATION})
    return f"/subscriptions/{SUB}/resourceGroups/userStaging"


async def test_fault_create_vm_fails(harness: AzureHarness) -> None:
    cloud = harness.workers[0][2]
    await prepare(cloud)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    template["properties"]["stagingResourceGroup"] = await user_staging_group(cloud)
    harness.arm.faults.add(method="PUT", path_regex="/virtualMachines/", status=409, code="QuotaExceeded",
                           message="Operation results in exceeding approved standardDv2Family Cores quota.", times=None)
    status = await harness.finish(await harness.start(template, "fault-vm"))
    assert status.run_state == RunState.FAILED
    assert "quota" in status.message.lower()
    assert harness.arm.resources({"kilnBuildId": status.build_id}) == []
    assert await cloud.arm.resource.resource_groups.check_existence("userStaging")


async def test_fault_cancel_during_customize(harness: AzureHarness) -> None:
    cloud = harness.workers[0][2]
    await prepare(cloud)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    template["properties"]["stagingResourceGroup"] = await user_staging_group(cloud)
    template["properties"]["customize"].insert(0, {"type": "Shell", "name": "slow", "inline": ["sleep 120"]})
    handle = await harness.start(template, "fault-cancel")
    await harness.wait_for_step(handle, "customize 1/")
    await handle.cancel()
    status = await harness.finish(handle)
    assert status.run_state == RunState.CANCELED
    assert harness.arm.resources({"kilnBuildId": status.build_id}) == []
    assert await cloud.arm.resource.resource_groups.check_existence("userStaging")


async def test_fault_worker_lost_mid_replication_resumes(harness: AzureHarness) -> None:
    cloud = harness.workers[0][2]
    await prepare(cloud, generation="V2")
    template = harness.corpus("q1_helloImageTemplateforSIG.json")
    template["properties"]["stagingResourceGroup"] = await user_staging_group(cloud)
    hang = harness.arm.faults.slow_replication(polls=None, regions=[REGION2])
    handle = await harness.start(template, "fault-replication")
    await harness.wait_for_step(handle, "distribute")
    await asyncio.sleep(1)  # the resume point (the poller's continuation token) is recorded
    await harness.stop_worker(0)  # the worker goes away while the version replicates
    harness.start_worker()  # and another one takes the build over
    hang.polls = 0
    status = await harness.finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message
    version_puts = [c for c in harness.arm.calls if c.method == "PUT" and "/versions/" in c.path
                    and "/images/ubuntu/" in c.path]
    assert len(version_puts) == 1  # picked up again, not started over
    assert status.run_outputs[0].replication == {LOCATION: "Completed", REGION2: "Completed"}
    assert temporary(harness.arm) == []
    assert await harness.workers[-1][2].arm.resource.resource_groups.check_existence("userStaging")
