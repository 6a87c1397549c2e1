"""Whole builds on the Azure cloud: the corpus's Linux templates through a real worker, the ImageBuild workflow,
the ARM emulator (real SDK clients), Azurite and real SSH guests; then the faults that matter most."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from activities.clouds.azure import AzureCloud
from tests.arm_emulator import ArmEmulator
from tests.azure.environment import (
    LOCATION,
    REGION2,
    SUB,
    AzureHarness,
    Guests,
    prepare,
    temporary,
)
from workflows.models import RunState


@pytest_asyncio.fixture
async def harness(
    client: Client, arm: ArmEmulator, blob_account: str, guests: Guests, tmp_path: Path
) -> AsyncIterator[AzureHarness]:
    guests.attach(arm)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    harness = AzureHarness(client, arm, blob_account, os.urandom(32), f"kiln-azure-test-{uuid.uuid4()}", artifacts, [])
    harness.start_worker()
    yield harness
    await harness.stop_workers()


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
            regions = {
                r if isinstance(r, str) else r["name"]
                for r in target.get("replicationRegions") or target.get("targetRegions")
            }
            assert set(output.replication) == regions and set(output.replication.values()) == {"Completed"}
            assert any(r["id"] == output.artifact_id for r in harness.arm.resources())
        else:
            blob = cloud.blobs.blob(output.artifact_uri)
            assert (await blob.get_blob_properties()).size > 0
    assert temporary(harness.arm) == []
    log = await (await cloud.blobs.blob(status.log_uri).download_blob()).readall()
    assert b"deprovision" in log and b"exit code 0" in log


async def test_managed_image_in_another_region_is_made_from_a_copy_of_the_snapshot(harness: AzureHarness) -> None:
    cloud = harness.workers[0][2]
    await prepare(cloud)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    target = template["properties"]["distribute"][0]
    target["location"] = REGION2
    status = await harness.finish(await harness.start(template, "q0-region2"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    image = next(r for r in harness.arm.resources() if r["id"].lower() == target["imageId"].lower())
    assert image["location"] == REGION2
    copies = [
        c
        for c in harness.arm.calls
        if c.method == "PUT" and c.path.endswith(f"/snapshots/{status.build_id}-out0-osdisk")
    ]
    assert len(copies) == 1
    assert [r for r in harness.arm.resources() if r["type"] == "Microsoft.Compute/snapshots"] == []
    assert temporary(harness.arm) == []


async def user_staging_group(cloud: AzureCloud) -> str:
    await cloud.arm.resource.resource_groups.create_or_update("userStaging", {"location": LOCATION})
    return f"/subscriptions/{SUB}/resourceGroups/userStaging"


async def test_fault_create_vm_fails(harness: AzureHarness) -> None:
    cloud = harness.workers[0][2]
    await prepare(cloud)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    template["properties"]["stagingResourceGroup"] = await user_staging_group(cloud)
    harness.arm.faults.add(
        method="PUT",
        path_regex="/virtualMachines/",
        status=409,
        code="QuotaExceeded",
        message="Operation results in exceeding approved standardDv2Family Cores quota.",
        times=None,
    )
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
    version_puts = [
        c for c in harness.arm.calls if c.method == "PUT" and "/versions/" in c.path and "/images/ubuntu/" in c.path
    ]
    assert len(version_puts) == 1  # picked up again, not started over
    assert status.run_outputs[0].replication == {LOCATION: "Completed", REGION2: "Completed"}
    assert temporary(harness.arm) == []
    assert await harness.workers[-1][2].arm.resource.resource_groups.check_existence("userStaging")
