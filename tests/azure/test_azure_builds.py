"""Whole builds on the Azure cloud: the corpus's Linux templates through a real worker, the ImageBuild workflow,
the ARM emulator (real SDK clients), Azurite and real SSH guests; then the faults that matter most."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from activities.clouds.azure import AzureCloud
from tests.azure.environment import (
    LOCATION,
    REGION2,
    RG,
    SUB,
    AzureHarness,
    make_gallery,
    prepare,
    temporary,
)
from tests.azure_live.live_build import leftovers, live_template
from tests.azure_live.recording import Recorder, read
from tests.fixtures import script_semantics
from tests.workflows.harness import retried_activities
from workflows.models import RunState

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
    await prepare(harness.arm.base_url, generation=generation)
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
    await prepare(harness.arm.base_url)
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


async def test_managed_images_in_two_other_regions_take_turns_copying_the_snapshot(harness: AzureHarness) -> None:
    """Azure copies the incremental snapshots of one disk one at a time: two ManagedImage targets in two other
    regions copy the captured snapshot in turn, each on its first try."""
    await prepare(harness.arm.base_url)
    harness.arm.snapshot_copy_polls = 3  # the first copy is still running when the second target wants to start
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    first = template["properties"]["distribute"][0]
    first["location"] = REGION2
    second = {**first, "runOutputName": "third", "imageId": first["imageId"] + "-3", "location": "westus3"}
    template["properties"]["distribute"].append(second)
    handle = await harness.start(template, "q0-turns")
    status = await harness.finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message
    assert await retried_activities(handle) == set()
    images = {r["id"].lower(): r.get("location") for r in harness.arm.resources()}
    assert images[first["imageId"].lower()] == REGION2 and images[second["imageId"].lower()] == "westus3"
    assert temporary(harness.arm) == []


async def test_scripts_run_as_aib_runs_them(harness: AzureHarness, tmp_path: Path) -> None:
    """Packer's shell provisioner semantics on a build VM reached over SSH (tests/fixtures/script_semantics.py)."""
    await prepare(harness.arm.base_url)
    for customize, check in (
        (script_semantics.passing_customizers(tmp_path), script_semantics.check_passing),
        (script_semantics.failing_customizers(), script_semantics.check_failing),
    ):
        template = harness.corpus("q0_helloImageTemplateLinux.json")
        template["properties"]["customize"] = customize
        status = await harness.finish(await harness.start(template, "scripts"))
        check(status, await harness.log(status))
    assert temporary(harness.arm) == []


async def test_a_gallery_target_without_regions_replicates_to_its_definitions_region(harness: AzureHarness) -> None:
    """Neither targetRegions nor replicationRegions (allowed from 2022-07-01): the definition's own region, and the
    build's region, where the version lives."""
    await prepare(harness.arm.base_url, generation="V2")
    gallery = await make_gallery(harness.arm.base_url, "regionlessGallery", REGION2, ("ubuntu",), generation="V2")
    template = harness.corpus("q1_helloImageTemplateforSIG.json")
    template["apiVersion"] = "2022-07-01"
    target = template["properties"]["distribute"][0]
    del target["replicationRegions"]
    target["galleryImageId"] = f"{gallery}/images/ubuntu"
    status = await harness.finish(await harness.start(template, "q1-regionless"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    [output] = status.run_outputs
    assert output.replication == {REGION2: "Completed", LOCATION: "Completed"}
    assert temporary(harness.arm) == []


async def test_a_gallery_in_another_region_gets_its_version_in_the_build_region(harness: AzureHarness) -> None:
    """As Packer and AIB make it: the version lives in the build's region, where the captured image is, and that
    region joins the target regions the user gave, whose replica counts are kept."""
    await prepare(harness.arm.base_url, generation="V2")
    gallery = await make_gallery(harness.arm.base_url, "farGallery", REGION2, ("ubuntu",), generation="V2")
    template = harness.corpus("q1_helloImageTemplateforSIG.json")
    template["apiVersion"] = "2022-07-01"  # the first to take targetRegions in place of replicationRegions
    target = template["properties"]["distribute"][0]
    del target["replicationRegions"]
    target["galleryImageId"] = f"{gallery}/images/ubuntu"
    target["targetRegions"] = [{"name": REGION2, "replicaCount": 2}]
    status = await harness.finish(await harness.start(template, "q1-far"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    [output] = status.run_outputs
    version = next(r for r in harness.arm.resources() if r["id"] == output.artifact_id)
    assert version["location"] == LOCATION
    published = version["properties"]["publishingProfile"]["targetRegions"]
    assert {r["name"]: r["regionalReplicaCount"] for r in published} == {REGION2: 2, LOCATION: 1}
    assert output.replication == {REGION2: "Completed", LOCATION: "Completed"}
    assert temporary(harness.arm) == []


async def test_the_live_suites_build_on_the_emulator(harness: AzureHarness, tmp_path: Path) -> None:
    """The build tests/azure_live makes on Azure (built in one region, into a gallery in another, a managed image in
    a third, under the shipped role), made here and checked the same way. With KILN_EMULATED_RECORDING set, its ARM
    traffic is kept there for the recorded-traffic check (python -m tests.azure_live.recording diff)."""
    await prepare(harness.arm.base_url, generation="V2")
    gallery = await make_gallery(harness.arm.base_url, "liveGallery", REGION2, ("live",), generation="V2")
    recording = Path(os.environ.get("KILN_EMULATED_RECORDING") or tmp_path / "emulated.jsonl")
    await harness.stop_worker(0)
    cloud = harness.start_worker(client_options={"per_retry_policies": [Recorder(recording)]})
    image_id = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/images/live"
    template = live_template(
        location=LOCATION,
        gallery_image_id=f"{gallery}/images/live",
        gallery_region=REGION2,
        image_id=image_id,
        image_location="westus3",
    )
    status = await harness.finish(await harness.start(template, "live"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    [version] = [o for o in status.run_outputs if o.type == "SharedImage"]
    assert version.replication == {REGION2: "Completed", LOCATION: "Completed"}
    image = next(r for r in harness.arm.resources() if r["id"].lower() == image_id.lower())
    assert image["location"] == "westus3"
    assert await leftovers(cloud, status, logs_kept=False) == []
    recorded = read(recording)
    assert any(r["method"] == "PUT" and "/images/live/versions/" in r["url"] for r in recorded)


async def user_staging_group(cloud: AzureCloud) -> str:
    await cloud.arm.resource.resource_groups.create_or_update("userStaging", {"location": LOCATION})
    return f"/subscriptions/{SUB}/resourceGroups/userStaging"


async def test_fault_create_vm_fails(harness: AzureHarness) -> None:
    cloud = harness.workers[0][2]
    await prepare(harness.arm.base_url)
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
    await prepare(harness.arm.base_url)
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
    await prepare(harness.arm.base_url, generation="V2")
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


async def test_a_gallery_version_that_fails_to_replicate_fails_its_target_at_once(harness: AzureHarness) -> None:
    """A region failing a version's replication fails that target on its first try (as Packer's wait fails AIB's;
    a retry would replicate every region anew) naming the region; the other target is kept, the failed version
    removed: PartiallySucceeded."""
    await prepare(harness.arm.base_url)
    harness.arm.faults.slow_replication(
        polls=1, regions=[REGION2], fail_code="ReplicationFailed", fail_message="storage unavailable in westus2"
    )
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    gallery = (
        f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/galleries/kilnGallery/images/ubuntu"
    )
    template["properties"]["distribute"].append(
        {
            "type": "SharedImage",
            "runOutputName": "gallery",
            "galleryImageId": gallery,
            "replicationRegions": [LOCATION, REGION2],
        }
    )
    handle = await harness.start(template, "q0-replication")
    status = await harness.finish(handle)
    assert status.run_state == RunState.PARTIALLY_SUCCEEDED, status.message
    assert f"failed to replicate to {REGION2}" in status.message and "storage unavailable" in status.message
    assert [o.provisioning_state for o in status.run_outputs] == ["Succeeded", "Failed"]
    assert await retried_activities(handle) == set()
    kept = harness.arm.resources({"kilnBuildId": status.build_id})
    assert [r["type"] for r in kept] == ["Microsoft.Compute/images"], kept
    assert temporary(harness.arm) == []
