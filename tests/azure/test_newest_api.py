"""AIB's newest API (2025-10-01), and the fields before it only some versions have, built on the Azure cloud:
the ImageBuild workflow through a real worker, the ARM emulator (the real SDK clients) and real SSH guests."""

from __future__ import annotations

import hashlib

from tests.azure.environment import LOCATION, REGION2, AzureHarness, make_gallery, prepare, temporary
from workflows.models import RunState

CHECK = b"#!/bin/sh\ntest -s /etc/motd && echo validated-by-file\n"


async def test_a_file_validator_puts_its_file_on_the_validation_vm(harness: AzureHarness) -> None:
    await prepare(harness.arm.base_url)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    template["apiVersion"] = "2022-07-01"  # File validators are there from this version on
    check = harness.artifacts / "check.sh"
    check.write_bytes(CHECK)
    template["properties"]["customize"] = [{"type": "Shell", "inline": ["echo golden | sudo tee /etc/motd"]}]
    template["properties"]["validate"] = {
        "inVMValidations": [
            {
                "type": "File",
                "name": "check script",
                "sourceUri": check.as_uri(),
                "destination": "/tmp/check.sh",
                "sha256Checksum": hashlib.sha256(CHECK).hexdigest(),
            },
            {"type": "Shell", "name": "run it", "inline": ["sh /tmp/check.sh"]},
        ]
    }
    status = await harness.finish(await harness.start(template, "file-validator"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    log = await harness.log(status, "validation.log")
    assert "validated-by-file" in log
    assert "validate 1/2: check script" in log
    assert temporary(harness.arm) == []


def shallow_template(harness: AzureHarness, region: str) -> dict:
    template = harness.corpus("q9trig_helloImageTemplate.json")
    template["apiVersion"] = "2025-10-01"
    target = template["properties"]["distribute"][0]
    target["targetRegions"] = [{"name": region}]
    target["replicationMode"] = "Shallow"
    return template


async def test_a_shallow_gallery_version_is_sent_as_shallow_and_is_there_without_replication(
    harness: AzureHarness,
) -> None:
    await prepare(harness.arm.base_url)
    harness.arm.faults.slow_replication(polls=None, regions=[LOCATION])  # a Full copy would never end
    status = await harness.finish(await harness.start(shallow_template(harness, LOCATION), "shallow"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    [output] = status.run_outputs
    assert output.replication == {LOCATION: "Completed"}
    [version] = [r for r in harness.arm.resources() if r["id"] == output.artifact_id]
    assert version["properties"]["publishingProfile"]["replicationMode"] == "Shallow"
    assert temporary(harness.arm) == []


async def test_a_shallow_gallery_version_elsewhere_is_refused_before_anything_is_made(harness: AzureHarness) -> None:
    await prepare(harness.arm.base_url)
    status = await harness.finish(await harness.start(shallow_template(harness, REGION2), "shallow-elsewhere"))
    assert status.run_state == RunState.FAILED
    assert f"targetRegions[0].name: '{REGION2}' is not the build's region" in status.message
    assert [s.name for s in status.steps] == ["resolve source"]
    assert not any(c.method == "PUT" and "/virtualMachines/" in c.path for c in harness.arm.calls)


async def test_vm_boot_optimization_boots_a_vm_of_the_captured_image_and_deletes_it(harness: AzureHarness) -> None:
    await prepare(harness.arm.base_url)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    template["apiVersion"] = "2022-07-01"  # optimize is there from this version on
    template["properties"]["optimize"] = {"vmBoot": {"state": "Enabled"}}
    status = await harness.finish(await harness.start(template, "vmboot"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    puts = [c.path for c in harness.arm.calls if c.method == "PUT"]
    booted = [i for i, p in enumerate(puts) if p.endswith(f"/virtualMachines/{status.build_id}-optimization")]
    captured = [i for i, p in enumerate(puts) if p.endswith(f"/images/{status.build_id}-image")]
    assert booted and captured and captured[0] < booted[0], "no VM was booted from the captured image"
    names = [s.name for s in status.steps if s.kind == "build"]
    assert names.index("create optimization VM") == names.index("capture image") + 1
    assert temporary(harness.arm) == []


async def test_the_workload_script_runs_checked_on_a_vm_of_the_captured_image(harness: AzureHarness) -> None:
    await prepare(harness.arm.base_url)
    workload = b'#!/bin/sh\necho "workload ran as $(id -un)"\n'
    script = harness.artifacts / "workload.sh"
    script.write_bytes(workload)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    template["apiVersion"] = "2025-10-01"
    template["properties"]["optimize"] = {
        "workload": {
            "state": "Enabled",
            "scriptUri": script.as_uri(),
            "sha256Checksum": hashlib.sha256(workload).hexdigest().upper(),  # as Get-FileHash prints it
        }
    }
    status = await harness.finish(await harness.start(template, "workload"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    assert status.warnings == []
    log = await harness.log(status)
    assert "Provisioning with shell: optimize workload" in log
    assert "workload ran as " in log
    assert log.index("optimize workload") > log.index("deprovision")  # on a VM made after capture
    puts = [c.path for c in harness.arm.calls if c.method == "PUT"]
    assert any(p.endswith(f"/virtualMachines/{status.build_id}-optimization") for p in puts)
    assert temporary(harness.arm) == []


async def test_data_disks_are_attached_to_the_build_vm_and_captured_into_every_image(harness: AzureHarness) -> None:
    """additionalDataDisks: empty disks on the build VM, snapshotted at capture; a managed image target has them
    at their LUNs, and a gallery version as dataDiskImages of their size. Their snapshots go with the build."""
    await prepare(harness.arm.base_url)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    gallery = harness.corpus("q9trig_helloImageTemplate.json")["properties"]["distribute"][0]
    gallery["targetRegions"] = [{"name": LOCATION}]
    gallery["runOutputName"] = "gallery"
    template["apiVersion"] = "2025-10-01"
    template["properties"]["distribute"].append(gallery)
    template["properties"]["additionalDataDisks"] = [{"sizeGB": 8}, {"sizeGB": 16}]
    status = await harness.finish(await harness.start(template, "data-disks"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    managed_id = template["properties"]["distribute"][0]["imageId"].lower()
    [managed] = [r for r in harness.arm.resources() if r["id"].lower() == managed_id]
    disks = managed["properties"]["storageProfile"]["dataDisks"]
    assert [(d["lun"], d["snapshot"]["id"].rsplit("/", 1)[1]) for d in disks] == [
        (0, f"{status.build_id}-image-data0"),
        (1, f"{status.build_id}-image-data1"),
    ]
    version_id = next(o.artifact_id for o in status.run_outputs if o.type == "SharedImage")
    [version] = [r for r in harness.arm.resources() if r["id"] == version_id]
    images = version["properties"]["storageProfile"]["dataDiskImages"]
    assert [(d["lun"], d["sizeInGB"]) for d in images] == [(0, 8), (1, 16)]
    assert temporary(harness.arm) == []
    assert not any(r["type"] == "Microsoft.Compute/disks" for r in harness.arm.resources())


async def test_a_data_disk_without_a_size_is_refused_before_anything_is_made(harness: AzureHarness) -> None:
    await prepare(harness.arm.base_url)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    template["apiVersion"] = "2025-10-01"
    template["properties"]["additionalDataDisks"] = [{"sizeGB": 8}, {}]
    status = await harness.finish(await harness.start(template, "data-disk-size"))
    assert status.run_state == RunState.FAILED
    assert "properties.additionalDataDisks[1].sizeGB: an empty data disk needs a size" in status.message
    assert [s.name for s in status.steps] == ["resolve source"]


async def trusted_target(harness: AzureHarness, template: dict) -> None:
    """Point the template's gallery target at a TrustedLaunch image definition."""
    features = [{"name": "SecurityType", "value": "TrustedLaunch"}]
    gallery = await make_gallery(
        harness.arm.base_url, "tlgallery", LOCATION, ("trusted",), generation="V2", features=features
    )
    template["properties"]["distribute"][0]["galleryImageId"] = f"{gallery}/images/trusted"


async def build_vm_security_profile(harness: AzureHarness, handle: object) -> dict:
    during = await harness.wait_for_step(handle, "customize")  # type: ignore[arg-type]
    [vm] = [r for r in harness.arm.resources() if r["id"].endswith(f"/virtualMachines/{during.build_id}-build")]
    return vm["properties"]["securityProfile"]


async def test_a_trusted_launch_definition_is_built_on_a_trusted_launch_vm(harness: AzureHarness) -> None:
    """A TrustedLaunchSupported Gen2 source into a TrustedLaunch gallery definition: the build VM has secure boot and
    vTPM on, and the version is made of its disk's snapshot (Azure makes no managed image of a TrustedLaunch VM,
    and the definition takes none)."""
    await prepare(harness.arm.base_url, generation="V2")
    template = harness.corpus("q1_helloImageTemplateforSIG.json")  # Ubuntu 20.04 Gen2: TrustedLaunchSupported
    await trusted_target(harness, template)
    handle = await harness.start(template, "trusted")
    assert await build_vm_security_profile(harness, handle) == {
        "securityType": "TrustedLaunch",
        "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True},
    }
    status = await harness.finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message
    [output] = status.run_outputs
    [version] = [r for r in harness.arm.resources() if r["id"] == output.artifact_id]
    source = version["properties"]["storageProfile"]["osDiskImage"]["source"]["id"]
    assert source.endswith(f"/snapshots/{status.build_id}-image-osdisk")
    assert not any(c.method == "PUT" and f"/images/{status.build_id}-image" in c.path for c in harness.arm.calls)
    assert temporary(harness.arm) == []


async def test_a_trusted_launch_supported_definition_is_built_on_a_standard_vm(harness: AzureHarness) -> None:
    """Into a TrustedLaunchSupported definition (a Gen2 one's default), which takes a managed image and no disk
    snapshot, the build VM is Standard (secure boot and vTPM off)."""
    await prepare(harness.arm.base_url, generation="V2")
    handle = await harness.start(harness.corpus("q1_helloImageTemplateforSIG.json"), "standard")
    assert await build_vm_security_profile(harness, handle) == {"securityType": "Standard"}
    status = await harness.finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message


async def test_a_trusted_launch_definition_with_a_validator_is_refused_before_anything_is_made(
    harness: AzureHarness,
) -> None:
    await prepare(harness.arm.base_url, generation="V2")
    template = harness.corpus("q1_helloImageTemplateforSIG.json")
    await trusted_target(harness, template)
    template["apiVersion"] = "2022-07-01"
    template["properties"]["validate"] = {"inVMValidations": [{"type": "Shell", "inline": ["true"]}]}
    status = await harness.finish(await harness.start(template, "trusted-validated"))
    assert status.run_state == RunState.FAILED
    assert "properties.validate: validation needs a managed image of the build" in status.message
    assert [s.name for s in status.steps] == ["resolve source"]
