"""AIB's optimize in the build saga, against the recording cloud: the image is booted once while the build is
Optimizing (vmBoot), after capture and before validation and distribution, the workload script runs on that VM,
and the VM is gone afterwards."""

from __future__ import annotations

import hashlib

from tests.workflows.harness import Harness
from workflows.models import RunState, RunSubState


async def test_vm_boot_optimization_boots_the_captured_image_while_optimizing(harness: Harness) -> None:
    template = harness.template(optimize={"vmBoot": {"state": "Enabled"}})
    del template["properties"]["validate"]  # the only VM besides the build VM is then the optimization one
    harness.cloud.inject("create_vm:validation", "slow", times=1)
    handle = await harness.start(template)
    during = await harness.wait_for_step(handle, "create optimization VM")
    assert during.run_sub_state == RunSubState.OPTIMIZING
    status = await harness.finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message
    names = [s.name for s in status.steps if s.kind == "build"]
    at = names.index("create optimization VM")
    assert names[at - 1] == "capture image" and names[at + 1].startswith("distribute")
    image = harness.cloud.vm_image(f"{status.build_id}-optimization")
    assert image is not None and image.endswith(f"{status.build_id}-image")  # made from the captured image
    assert harness.cloud.alive() == []


async def test_without_vm_boot_no_image_is_booted_to_optimize(harness: Harness) -> None:
    template = harness.template(optimize={"vmBoot": {"state": "Disabled"}})
    status = await harness.finish(await harness.start(template))
    assert status.run_state == RunState.SUCCEEDED, status.message
    assert not any("optimization" in s.name for s in status.steps)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def workload_template(harness: Harness, data: bytes, checksum: str) -> dict:
    script = harness.artifacts / "workload.sh"
    script.write_bytes(data)
    template = harness.template(
        optimize={"workload": {"state": "Enabled", "scriptUri": script.as_uri(), "sha256Checksum": checksum}}
    )
    del template["properties"]["validate"]
    return template


async def test_the_workload_script_runs_on_a_vm_of_the_captured_image(harness: Harness) -> None:
    data = b"#!/bin/sh\necho warming\n"
    status = await harness.finish(await harness.start(workload_template(harness, data, sha256(data))))
    assert status.run_state == RunState.SUCCEEDED, status.message
    names = [s.name for s in status.steps if s.kind == "build"]
    assert names[names.index("capture image") + 1 :][:2] == ["create optimization VM", "optimize workload"]
    assert harness.cloud.alive() == []


async def test_a_workload_script_with_the_wrong_checksum_fails_before_any_vm(harness: Harness) -> None:
    status = await harness.finish(await harness.start(workload_template(harness, b"echo x\n", "0" * 64)))
    assert status.run_state == RunState.FAILED
    assert "properties.optimize.workload.scriptUri" in status.message
    assert not any(s.name.startswith("create") and "VM" in s.name for s in status.steps)
    assert harness.cloud.alive() == []
