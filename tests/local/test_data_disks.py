"""additionalDataDisks on the local cloud, end to end: one real build whose customizer formats and fills a data disk,
captured, distributed and read back in the booted image; the same image's disks back in a VM made from it; and
builds with data disks that fail or are refused, leaving nothing.

The build boots its image once (its validator reads the data disk there), so this file holds one such build and
runs the cheap cases beside it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from activities.clouds.base import PermanentError
from activities.clouds.local.data_disks import loop_devices
from activities.clouds.local.staging import LOCAL_SUBSCRIPTION
from tests.local.builds import LocalBuilds, debugfs, download_vhd, shell, template
from tests.local.test_builds import assert_clean
from tests.local.vms import STAGING, new_build
from tests.workflows.harness import check_all
from workflows.models import RunState, VmSpec
from workflows.template import VmProfile, parse_template

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(os.geteuid() != 0, reason="local builds need root"),
    pytest.mark.timeout(900),  # a build, then a boot under TCG: minutes on a busy machine
]

DATA_DISKS = [{"sizeGB": 1}, {"sizeGB": 2}]
LUN0 = "/dev/disk/azure/scsi1/lun0"
# What a user's script on Azure does with a new data disk: format it, mount it, fill it.
FILL_LUN0 = shell(
    "data disk",
    f"sudo mkfs.ext4 -q -L data {LUN0}",
    "sudo mkdir /data",
    f"sudo mount {LUN0} /data",
    "echo 'kept on LUN 0' | sudo tee /data/kiln-data",
    "sudo umount /data",
    "test -b /dev/disk/azure/data/by-lun/1",
)
READ_LUN0 = shell("data disk", f"sudo mount -o ro {LUN0} /mnt", "cat /mnt/kiln-data", "sudo umount /mnt")


def loop_devices_of(vm: str) -> list[str]:
    return [device for device, file in loop_devices().items() if f"/{vm}/" in file]


def loop_partitions() -> set[str]:
    """The partitions of loop devices on this machine, attached or not (the kernel keeps one added by BLKPG)."""
    return {str(p) for p in Path("/sys/block").glob("loop*/loop*p*")}


async def test_data_disks_are_made_captured_distributed_booted_and_come_back(local_builds: LocalBuilds) -> None:
    definition = await local_builds.make_gallery()
    image_id = (
        f"/subscriptions/{LOCAL_SUBSCRIPTION}/resourceGroups/kiln-tests/providers/Microsoft.Compute/images/"
        f"disks-{uuid.uuid4().hex[:8]}"
    )
    targets = [
        {"type": "ManagedImage", "runOutputName": "managed", "imageId": image_id, "location": "westeurope"},
        {
            "type": "SharedImage",
            "runOutputName": "gallery",
            "galleryImageId": definition,
            "targetRegions": [{"name": "westeurope", "replicaCount": 2}],
        },
    ]
    disks = {"additionalDataDisks": DATA_DISKS}
    partitions_before = loop_partitions()

    async def built() -> None:
        build = await local_builds.start(
            template([FILL_LUN0], targets, validate={"inVMValidations": [READ_LUN0]}, **disks), prefix="disks"
        )
        status = await local_builds.finish(build)
        assert status.run_state == RunState.SUCCEEDED, status.message
        assert "kept on LUN 0" in await local_builds.log(status, "validation.log")  # read in the booted image
        outputs = {o.run_output_name: o for o in status.run_outputs}

        managed = local_builds.store.get(image_id.lower())
        assert managed is not None
        assert [(d["lun"], d["sizeBytes"]) for d in managed.data["dataDiskImages"]] == [(0, 1 << 30), (1, 2 << 30)]
        version = local_builds.store.get(outputs["gallery"].artifact_id.lower())
        assert version is not None
        assert [(d["lun"], d["sizeBytes"]) for d in version.data["dataDiskImages"]] == [(0, 1 << 30), (1, 2 << 30)]
        [region] = version.data["regions"].values()
        assert [len(replicas) for replicas in region["dataDiskBlobs"]] == [2, 2]
        for url in (managed.data["dataDiskImages"][0]["blobUrl"], region["dataDiskBlobs"][0][1]):
            lun0 = await download_vhd(url, local_builds.files.folder / "lun0.vhd")
            assert debugfs(lun0, "cat /kiln-data") == "kept on LUN 0\n"
        await assert_clean(local_builds, build, kept={"log", "output"})
        await comes_back(image_id)

    async def comes_back(source_id: str) -> None:
        """A VM made from the managed image has its data disks, filled as they were captured; a build that would
        add empty ones beside them is refused before anything is made."""
        cloud = local_builds.cloud
        source = {"type": "ManagedImage", "imageId": source_id}
        with pytest.raises(PermanentError) as refused:
            await cloud.resolve_source(new_build(), parse_template(template([], source=source, **disks)))
        assert refused.value.type == "BadDataDisk" and "has data disks of its own" in refused.value.message
        build = new_build("disks-back")
        resolved = await cloud.resolve_source(build, parse_template(template([], source=source)))
        spec = VmSpec(
            name=f"{build.build_id}-build", purpose="build", image_id=source_id, source=resolved, vm_profile=VmProfile()
        )
        image = await local_builds.storage.locate_image(source_id)
        try:
            vm = await cloud.create_vm(build, STAGING, spec)
            assert await cloud.create_vm(build, STAGING, spec) == vm  # create-or-get
            read = await cloud.vms.session(vm.name).command(
                f"mount -o ro {LUN0} /mnt && cat /mnt/kiln-data", stdin=None
            )
            assert read.stdout == b"kept on LUN 0\n", read.stderr
        finally:
            for _ in range(2):  # a delete of what is gone succeeds
                await cloud.delete_vm(build, spec.name)
            await cloud.images.forget_unpacked(image.vhd_path)  # the VM's root, unpacked from the image
            for cached in (image.vhd_path, *image.data_disks):
                cached.unlink()
        assert not cloud.vms.folder(spec.name).path.exists() and not loop_devices_of(spec.name)
        assert await asyncio.to_thread(local_builds.store.list, build_id=build.build_id) == []

    async def fails() -> None:
        """A customizer that leaves a data disk mounted and another one partitioned fails the build: its disks,
        their loop devices and partitions go with the VM."""
        fill_and_fail = shell(
            "fails",
            f"sudo mkfs.ext4 -q {LUN0}",
            f"sudo mount {LUN0} /mnt",
            "printf 'label: gpt\\n,\\n' | sudo sfdisk -q /dev/disk/azure/scsi1/lun1",
            "sudo partx -a /dev/disk/azure/scsi1/lun1",
            "exit 3",
        )
        build = await local_builds.start(template([fill_and_fail], **disks), prefix="disks-fail")
        status = await local_builds.finish(build)
        assert status.run_state == RunState.FAILED and "exit code 3" in status.message, status.message
        await assert_clean(local_builds, build, kept={"log"})

    async def refused() -> None:
        build = await local_builds.start(template([], additionalDataDisks=[{"sizeGB": 1}, {"sizeGB": 0}]))
        status = await local_builds.finish(build)
        assert status.run_state == RunState.FAILED
        assert "properties.additionalDataDisks[1].sizeGB: an empty data disk needs a size" in status.message
        assert not build.vms
        await assert_clean(local_builds, build, kept=set())

    await check_all({"built": built(), "fails": fails(), "refused": refused()})
    assert loop_partitions() <= partitions_before
