"""AIB's build semantics as kiln keeps them: errorHandling, partial success, validation options, template checks,
the build timeout, and what a cancel removes."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle

from tests.workflows.harness import Harness
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildStatus, RunState

VM_PARTS = {"virtualMachine", "publicIp", "networkSecurityGroup", "networkInterface", "disk"}
STAGING = {"resourceGroup", "storageAccount", "blob"}
CHECK = [{"type": "Shell", "name": "check", "inline": ["test -f /tmp/configured"]}]


def created(harness: Harness) -> set[str]:
    return {id for op, id in harness.cloud.events() if op == "create"}


def deleted(harness: Harness) -> set[str]:
    return {id for op, id in harness.cloud.events() if op == "delete"}


def output_ids(status: BuildStatus, *names: str) -> set[str]:
    """The artifact of each named output: as its run output reports it (a gallery target's is the version it
    claimed), else the name the recording cloud gives it from the build."""
    reported = {o.run_output_name: o.artifact_id for o in status.run_outputs if o.artifact_id}
    return {reported.get(name, f"{status.build_id}/{name}") for name in names}


def assert_kept(harness: Harness, status: BuildStatus, vm: str) -> None:
    """Exactly the VM ``vm``, its parts, and the staging group and storage they live in are left, and listed."""
    alive = harness.cloud.alive(include_outputs=True)
    assert {kind for kind, _ in alive} == VM_PARTS | STAGING
    assert [id for kind, id in alive if kind == "virtualMachine"] == [vm]
    # The staged blobs live in the kept storage account, which is what the status lists.
    assert {r.id for r in status.kept_on_abort} == {id for kind, id in alive if kind != "blob"}
    assert "kept for debugging" in status.message and vm in status.message


async def test_abort_on_customizer_error_keeps_the_build_vm_for_debugging(harness: Harness) -> None:
    """onCustomizerError abort leaves the build VM, its parts and its staging group, and says so."""
    harness.cloud.inject("customize", "fatal")
    status = await harness.finish(await harness.start(harness.template(errorHandling={"onCustomizerError": "abort"})))

    assert status.run_state == RunState.FAILED
    assert "customize 1/3: packages failed" in status.message
    assert_kept(harness, status, f"{status.build_id}-build")


async def test_cleanup_on_customizer_error_deletes_the_build_vm(harness: Harness) -> None:
    """onCustomizerError cleanup deletes everything the failed build made."""
    harness.cloud.inject("customize", "fatal")
    status = await harness.finish(await harness.start(harness.template(errorHandling={"onCustomizerError": "cleanup"})))

    assert status.run_state == RunState.FAILED
    assert f"{status.build_id}-build" in created(harness)
    assert harness.cloud.alive(include_outputs=True) == []
    assert status.kept_on_abort == []


async def test_abort_on_validation_error_keeps_the_validation_vm(harness: Harness) -> None:
    """onValidationError abort leaves the validation VM (the build VM and the image are gone, nothing is published)."""
    harness.cloud.inject("validate", "fatal")
    status = await harness.finish(await harness.start(harness.template(errorHandling={"onValidationError": "abort"})))

    assert status.run_state == RunState.FAILED
    assert "validate 1/1: check failed" in status.message
    assert_kept(harness, status, f"{status.build_id}-validation")


async def test_one_failed_target_of_three_is_partial_success(harness: Harness) -> None:
    """One target failing is PartiallySucceeded: its partial output is removed, the other two are kept."""
    harness.cloud.inject("distribute:vhd", "fatal")
    status = await harness.finish(await harness.start(harness.template()))

    assert status.run_state == RunState.PARTIALLY_SUCCEEDED
    assert "vhd: injected failure at distribute:vhd" in status.message
    assert {o.run_output_name: o.provisioning_state for o in status.run_outputs} == {
        "managed": "Succeeded", "gallery": "Succeeded", "vhd": "Failed"
    }  # fmt: skip
    assert {id for _, id in harness.cloud.alive(include_outputs=True)} == output_ids(status, "managed", "gallery")
    assert output_ids(status, "vhd") <= deleted(harness)


@pytest.mark.parametrize("continue_distribute", [True, False])
async def test_failed_validation_distributes_only_with_continue_distribute_on_failure(
    harness: Harness, continue_distribute: bool
) -> None:
    """A failed validator fails the build either way; continueDistributeOnFailure decides whether it publishes."""
    harness.cloud.inject("validate", "fatal")
    validate = {"continueDistributeOnFailure": continue_distribute, "inVMValidations": CHECK}
    status = await harness.finish(await harness.start(harness.template(validate=validate)))

    assert status.run_state == RunState.FAILED
    assert "validate 1/1: check failed" in status.message
    assert harness.cloud.alive() == []
    published = {id for _, id in harness.cloud.alive(include_outputs=True)}
    if continue_distribute:
        assert published == output_ids(status, "managed", "gallery", "vhd")
        assert status.message.startswith("Validation failed: ")
    else:
        assert published == set()
        assert status.run_outputs == []


async def test_source_validation_only_validates_the_source_and_builds_nothing(harness: Harness) -> None:
    """sourceValidationOnly runs the validators on a VM made from the source: no build VM, no image, no outputs."""
    validate = {"sourceValidationOnly": True, "inVMValidations": CHECK}
    status = await harness.finish(await harness.start(harness.template(validate=validate)))

    assert status.run_state == RunState.SUCCEEDED, status.message
    build_id = status.build_id
    assert f"{build_id}-build" not in created(harness)
    assert f"{build_id}-image" not in created(harness)
    assert harness.cloud.vm_image(f"{build_id}-validation") == "recorded-source-PlatformImage"
    assert harness.cloud.script_starts() == {f"{build_id}-validation-0": 1}
    assert status.run_outputs == []
    assert harness.cloud.alive(include_outputs=True) == []


async def test_an_invalid_template_fails_before_anything_is_made_listing_every_issue(harness: Harness) -> None:
    """Every problem of the template is reported at once, and no resource is made for it."""
    template = harness.template(buildTimeoutInMinutes=3)
    del template["properties"]["source"]["sku"]
    template["properties"]["distribute"][2]["runOutputName"] = "bad name!"
    status = await harness.finish(await harness.start(template))

    assert status.run_state == RunState.FAILED
    for path in ("properties.source.sku", "properties.distribute[2].runOutputName", "properties.buildTimeoutInMinutes"):
        assert path in status.message
    assert harness.cloud.events() == []


async def test_a_file_destination_outside_tmp_is_refused_before_staging(harness: Harness) -> None:
    """On a Linux source the File customizer may write only under /tmp; the build says which field is wrong."""
    template = harness.template()
    template["properties"]["customize"][2]["destination"] = "/etc/index.html"
    status = await harness.finish(await harness.start(template))

    assert status.run_state == RunState.FAILED
    assert "properties.customize[2].destination" in status.message
    assert [s.name for s in status.steps] == ["resolve source"]
    assert harness.cloud.events() == []


async def test_an_os_disk_smaller_than_the_sources_is_refused_before_anything_is_made(harness: Harness) -> None:
    """osDiskSizeGB can only grow the source's disk, as Azure has it; kiln says so once it knows the source."""
    template = harness.template()
    template["properties"]["vmProfile"] = {"osDiskSizeGB": 16}
    status = await harness.finish(await harness.start(template))

    assert status.run_state == RunState.FAILED
    assert "properties.vmProfile.osDiskSizeGB: 16 GB is smaller than the source image's 30 GB disk" in status.message
    assert [s.name for s in status.steps] == ["resolve source"]
    assert harness.cloud.events() == []


async def wait_for_steps(handle: WorkflowHandle[Any, Any], names: set[str]) -> None:
    async with asyncio.timeout(60):
        while not names <= {
            s.name for s in (await handle.query(ImageBuildWorkflow.status)).steps if s.outcome == "succeeded"
        }:
            await asyncio.sleep(0.2)


async def test_cancel_during_distribution_removes_finished_outputs_too(harness: Harness) -> None:
    """A cancelled build publishes nothing, even the targets that had finished when the cancel came."""
    harness.cloud.inject("distribute:vhd", "hang", times=1)
    handle = await harness.start(harness.template())
    await harness.wait_for_fault("distribute:vhd")
    await wait_for_steps(handle, {"distribute ManagedImage managed", "distribute SharedImage gallery"})
    await handle.cancel()
    status = await harness.finish(handle)

    assert status.run_state == RunState.CANCELED
    assert output_ids(status, "managed", "gallery", "vhd") <= deleted(harness)
    assert harness.cloud.alive(include_outputs=True) == []


async def test_a_cancel_during_cleanup_does_not_stop_the_cleanup(harness: Harness) -> None:
    """Once a failed build is cleaning up, a cancel request neither cuts the cleanup short nor hides the failure."""
    harness.cloud.inject("customize", "fatal")
    harness.cloud.inject("delete_vm", "slow", times=1)
    handle = await harness.start(harness.template())
    await harness.wait_for_fault("delete_vm")
    await handle.cancel()
    status = await harness.finish(handle)

    assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED
    assert status.run_state == RunState.FAILED
    assert "customize 1/3: packages failed" in status.message
    cleanup = {s.name: s.outcome for s in status.steps if s.name.startswith("cleanup")}
    assert cleanup == {"cleanup: delete build VM": "succeeded", "cleanup: delete staging": "succeeded"}
    assert harness.cloud.alive(include_outputs=True) == []


async def test_build_timeout_in_minutes_sets_the_deadline(harness: Harness) -> None:
    """buildTimeoutInMinutes 0 means AIB's default of 4 hours; any other value is taken as it is."""
    zero, eighty = await asyncio.gather(
        harness.start(harness.template(buildTimeoutInMinutes=0)),
        harness.start(harness.template(buildTimeoutInMinutes=80)),
    )
    for handle, minutes in ((zero, 240), (eighty, 80)):
        status = await harness.finish(handle)
        assert status.deadline is not None and status.start_time is not None
        assert status.deadline - status.start_time == timedelta(minutes=minutes)
