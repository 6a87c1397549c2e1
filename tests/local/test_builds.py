"""Real local builds, end to end: a worker on the local cloud, the cached Debian base, the session's Azurite.

Each build is checked for what a user sees (its status, its logs, the image it made) and for what it must not leave
behind: no VM process, mount, VM folder, loopback address, cgroup, captured image or staging blob, and a resource
store that holds only the build's logs and outputs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import WorkflowExecutionStatus

from activities.clouds.local.gallery_target import GALLERY_CONTAINER
from activities.clouds.local.staging import LOCAL_SUBSCRIPTION
from cli.builds import EXIT_USAGE
from cli.main import main
from tests.fixtures import script_semantics
from tests.local.builds import (
    SOURCE,
    Build,
    LocalBuilds,
    debugfs,
    download_vhd,
    region_blobs,
    shell,
    template,
    worker_process,
)
from tests.local.vms import host
from tests.workflows.harness import check_all, retried_counts
from workflows.models import RunState

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(os.geteuid() != 0, reason="local builds need root"),
]

RELEASE = b"NAME=kiln golden\nVERSION=1\n"
CONFIGURE = b"#!/bin/sh\nset -e\necho 'configure: writing /etc/kiln-configured'\necho configured | sudo tee /etc/kiln-configured\n"
STARTED = PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
LONG_STEP = shell("long", "echo 'long: started'", "sleep 120", "echo 'long: never'")


async def assert_clean(builds: LocalBuilds, build: Build, *, kept: set[str]) -> None:
    """Nothing temporary of the build is left, and the store holds only what it keeps on purpose."""
    assert await builds.leftovers(build) == []
    assert set(builds.kept(build)) == kept


async def check_exports(build: Build, images: dict[str, Path], folder: Path) -> None:
    """``kiln export`` writes a real build's outputs with the same disk inside, and a bad ask fails clearly (every
    format is checked on a small disk in test_storage.py)."""
    name = build.handle.id
    for output, disk_format in (("vhd", "qcow2"), ("gallery", "vmdk")):
        path = folder / f"{output}.{disk_format}"
        assert await asyncio.to_thread(main, ["export", name, str(path), "--run-output", output]) == 0
        info = json.loads(await host("qemu-img", "info", "--output=json", str(path)))
        assert info["format"] == disk_format
        await host("qemu-img", "compare", "-q", "-f", "vpc", "-F", disk_format, str(images[output]), str(path))
        path.unlink()
    assert await asyncio.to_thread(main, ["export", name, str(folder / "disk.qcow2")]) == EXIT_USAGE  # which one?
    assert not list(folder.glob("*.qcow2")) and not list(folder.glob(".*partial"))


@pytest.mark.timeout(600)  # a build with a boot check, then two conversions of its ~2 GiB disks
async def test_a_template_end_to_end(
    local_builds: LocalBuilds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Linux step, a validator, a VHD and a gallery in three regions: the customizations are in the image."""
    script_uri, script_sha = local_builds.files.add("configure.sh", CONFIGURE)
    release = tmp_path / "kiln-release"
    release.write_bytes(RELEASE)
    definition = await local_builds.make_gallery()
    regions = [
        {"name": "westeurope", "replicaCount": 1},
        {"name": "eastus", "replicaCount": 2},
        {"name": "southeastasia"},
    ]
    build = await local_builds.start(
        template(
            [
                shell("motd", "echo 'motd: writing /etc/motd'", "echo 'built by kiln' | sudo tee /etc/motd"),
                {"type": "Shell", "name": "configure", "scriptUri": script_uri, "sha256Checksum": script_sha},
                {
                    "type": "File",
                    "name": "release",
                    "sourceUri": release.as_uri(),
                    "destination": "/tmp/kiln-release",
                    "sha256Checksum": hashlib.sha256(RELEASE).hexdigest(),
                },
                shell("install", "sudo install -m 0644 /tmp/kiln-release /etc/kiln-release", "echo 'install: done'"),
            ],
            [
                {"type": "VHD", "runOutputName": "vhd"},
                {
                    "type": "SharedImage",
                    "runOutputName": "gallery",
                    "galleryImageId": definition,
                    "targetRegions": regions,
                },
            ],
            validate={"inVMValidations": [shell("check", "grep -q golden /etc/kiln-release", "echo 'check: found'")]},
        ),
        prefix="golden",
    )
    status = await local_builds.finish(build)
    assert status.run_state == RunState.SUCCEEDED, status.message
    outputs = {o.run_output_name: o for o in status.run_outputs}
    assert outputs["gallery"].replication == {r["name"]: "Completed" for r in regions}

    log = await local_builds.log(status)
    for line in (
        "motd: writing /etc/motd",
        "configure: writing /etc/kiln-configured",
        f"{len(RELEASE)} bytes copied",
        "install: done",
        "-force -deprovision+user && export HISTSIZE=0 && sync",
        "account and entire home directory will be deleted",
    ):
        assert line in log
    assert "check: found" in await local_builds.log(status, "validation.log")

    version = outputs["gallery"].artifact_id.lower().lstrip("/") + "/"
    for region in regions:
        replicas = await region_blobs(local_builds.storage.endpoint, region["name"], GALLERY_CONTAINER, version)
        assert len(replicas) == region.get("replicaCount", 1), region["name"]
        assert len(set(replicas.values())) == 1  # replicas of one image, all of the same size

    gallery_image = (await local_builds.storage.locate_image(outputs["gallery"].artifact_id)).vhd_path
    vhd = await download_vhd(outputs["vhd"].artifact_uri, tmp_path / "output.vhd")
    try:
        monkeypatch.setenv("TEMPORAL_ADDRESS", local_builds.client.service_client.config.target_host)
        await check_exports(build, {"vhd": vhd, "gallery": gallery_image}, tmp_path)
        for image in (vhd, gallery_image):
            assert debugfs(image, "cat /etc/motd") == "built by kiln\n"
            assert debugfs(image, "cat /etc/kiln-configured") == "configured\n"
            assert debugfs(image, "cat /etc/kiln-release").encode() == RELEASE
            assert not [line for line in debugfs(image, "cat /etc/passwd").splitlines() if line.startswith("kiln-")]
            assert "ssh_host_" not in debugfs(image, "ls /etc/ssh")
            assert "kiln-guest" not in debugfs(image, "ls /var/lib")
    finally:
        gallery_image.unlink()
    await assert_clean(local_builds, build, kept={"log", "output"})


async def test_scripts_run_as_aib_runs_them(local_builds: LocalBuilds, tmp_path: Path) -> None:
    """Packer's shell provisioner semantics on a real build VM (tests/fixtures/script_semantics.py)."""

    async def passing() -> None:
        build = await local_builds.start(template(script_semantics.passing_customizers(tmp_path)), prefix="scripts")
        status = await local_builds.finish(build)
        script_semantics.check_passing(status, await local_builds.log(status))

    async def failing() -> None:
        build = await local_builds.start(template(script_semantics.failing_customizers()), prefix="stops")
        status = await local_builds.finish(build)
        script_semantics.check_failing(status, await local_builds.log(status))
        await assert_clean(local_builds, build, kept={"log"})

    await check_all({"passing": passing(), "failing": failing()})


async def test_cleanup_after_a_failure_a_cancel_and_a_timeout(local_builds: LocalBuilds) -> None:
    """A failing customizer, a cancel and a timeout mid-script: each stops the script and removes the VM, its
    parts and the staging storage, and keeps only the log."""

    async def failing() -> None:
        build = await local_builds.start(
            template([shell("fails", "echo 'fails: giving up'", "exit 3")]), prefix="fails"
        )
        status = await local_builds.finish(build)
        assert status.run_state == RunState.FAILED
        assert "customize 1/1: fails failed with exit code 3" in status.message
        assert "fails: giving up" in status.message
        assert "exit code 3" in await local_builds.log(status)
        assert build.vms
        await assert_clean(local_builds, build, kept={"log"})

    async def canceled() -> None:
        build = await local_builds.start(template([LONG_STEP]), prefix="cancel")
        await local_builds.wait_for_log(build, "long: started")
        await build.handle.cancel()
        status = await local_builds.finish(build)
        assert status.run_state == RunState.CANCELED
        assert status.message.startswith("Canceled during customize 1/1: long")
        log = await local_builds.log(status)
        assert "stopped, the build was cancelled" in log and "long: never" not in log
        await assert_clean(local_builds, build, kept={"log"})

    async def timed_out() -> None:
        build = await local_builds.start(template([LONG_STEP]), prefix="timeout")
        await local_builds.wait_for_log(build, "long: started")
        await local_builds.set_deadline(build, 0)
        status = await local_builds.finish(build)
        assert status.run_state == RunState.FAILED
        assert status.message.startswith("The build timed out during customize 1/1: long")
        assert "long: never" not in await local_builds.log(status)
        await assert_clean(local_builds, build, kept={"log"})

    await check_all({"failing customizer": failing(), "cancel": canceled(), "timeout": timed_out()})


async def test_a_worker_killed_mid_customizer(local_builds: LocalBuilds) -> None:
    """SIGKILL the worker while a script runs and start another: the script ran once, its output is in the log
    once and whole, and the build succeeds and leaves nothing temporary."""
    queue = f"{local_builds.task_queue}-process"
    step = shell(
        "slow", "echo 'slow: started'", "sleep 5", "echo once | sudo tee -a /etc/kiln-marker", "echo 'slow: done'"
    )
    endpoint = local_builds.storage.endpoint
    async with worker_process(local_builds.client, local_builds.state, endpoint, queue) as first:
        build = await local_builds.start(template([step]), prefix="killed", task_queue=queue)
        await local_builds.wait_for_log(build, "slow: started")
        first.send_signal(signal.SIGKILL)
        await first.wait()
    async with worker_process(local_builds.client, local_builds.state, endpoint, queue):
        status = await local_builds.finish(build)
    assert status.run_state == RunState.SUCCEEDED, status.message
    vhd = await download_vhd(status.run_outputs[0].artifact_uri, local_builds.files.folder / "killed.vhd")
    assert debugfs(vhd, "cat /etc/kiln-marker") == "once\n"
    await assert_clean(local_builds, build, kept={"log", "output"})
    log = await local_builds.log(status)
    assert log.count("slow: started") == 1 and log.count("once\n") == 1 and log.count("slow: done") == 1, log


async def test_a_worker_killed_mid_deprovision(local_builds: LocalBuilds) -> None:
    """SIGKILL the worker while AIB's deprovision runs (it deletes the admin user and the host keys the worker
    logged in with) and start another: the new worker follows the run through the VM's own namespaces, and the
    build succeeds, generalized, leaving nothing temporary."""
    queue = f"{local_builds.task_queue}-process"
    override = shell(
        "slow deprovision",
        "printf '%s\\n' 'echo \"deprovision: started\"' 'sleep 4' "
        "'waagent -force -deprovision+user && export HISTSIZE=0 && sync' > /tmp/DeprovisioningScript.sh",
    )
    endpoint = local_builds.storage.endpoint
    async with worker_process(local_builds.client, local_builds.state, endpoint, queue) as first:
        build = await local_builds.start(template([override]), prefix="deprov", task_queue=queue)
        await local_builds.wait_for_log(build, "deprovision: started")
        first.send_signal(signal.SIGKILL)
        await first.wait()
    async with worker_process(local_builds.client, local_builds.state, endpoint, queue):
        status = await local_builds.finish(build)
    assert status.run_state == RunState.SUCCEEDED, status.message
    vhd = await download_vhd(status.run_outputs[0].artifact_uri, local_builds.files.folder / "deprov.vhd")
    assert debugfs(vhd, "ls -l /etc/ssh").count("ssh_host_") == 0  # generalized: no host keys
    await assert_clean(local_builds, build, kept={"log", "output"})
    log = await local_builds.log(status)
    assert log.count("deprovision: started") == 1 and "deprovision: exit code 0" in log, log


# The steps after the customizers a worker is killed in, one after another in one build: each one's activity, and
# how many of them run at the kill (the three targets distribute at once). The build VM's delete between them is
# often over before a kill lands, so the chaos soak (which counts where its kills land) covers cleanup.
KILLED_IN = {"capture_image": 1, "distribute": 3}


async def started(build: Build, activity: str, count: int) -> None:
    """Wait until ``count`` activities of type ``activity`` have started on a worker, looking often: some take a
    second or two. Temporal answers this without a worker."""
    async with asyncio.timeout(300):
        while True:
            description = await build.handle.describe()
            assert description.status == WorkflowExecutionStatus.RUNNING, f"the build ended before {activity} ran"
            pending = description.raw_description.pending_activities
            if sum(a.activity_type.name == activity and a.state == STARTED for a in pending) >= count:
                return
            await asyncio.sleep(0.05)


async def test_a_worker_killed_in_capture_and_in_each_distribution_target(
    local_builds: LocalBuilds, tmp_path: Path
) -> None:
    """SIGKILL the worker during capture, and while a VHD, a ManagedImage and a gallery version are distributed,
    starting another each time: each step is taken over, the build succeeds with
    its customization (a File and a Shell customizer) in every output, and leaves nothing temporary."""
    queue = f"{local_builds.task_queue}-process"
    release = tmp_path / "kiln-release"
    release.write_bytes(RELEASE)
    definition = await local_builds.make_gallery()
    image = f"/subscriptions/{LOCAL_SUBSCRIPTION}/resourceGroups/kiln-tests/providers/Microsoft.Compute/images/k{os.getpid()}"
    customize = [
        {"type": "File", "name": "release", "sourceUri": release.as_uri(), "destination": "/tmp/kiln-release"},
        shell("install", "sudo install -m 0644 /tmp/kiln-release /etc/kiln-release"),
    ]
    distribute = [
        {"type": "VHD", "runOutputName": "vhd"},
        {"type": "ManagedImage", "runOutputName": "managed", "imageId": image, "location": "westeurope"},
        {
            "type": "SharedImage",
            "runOutputName": "gallery",
            "galleryImageId": definition,
            "targetRegions": [{"name": "westeurope"}],
        },
    ]
    endpoint = local_builds.storage.endpoint
    async with AsyncExitStack() as workers:
        worker = await workers.enter_async_context(
            worker_process(local_builds.client, local_builds.state, endpoint, queue)
        )
        build = await local_builds.start(template(customize, distribute), prefix="killed-late", task_queue=queue)
        for activity, count in KILLED_IN.items():
            await started(build, activity, count)
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
            worker = await workers.enter_async_context(
                worker_process(local_builds.client, local_builds.state, endpoint, queue)
            )
        status = await local_builds.finish(build)
    assert status.run_state == RunState.SUCCEEDED, status.message
    retried = await retried_counts(build.handle)
    assert {activity: retried[activity] for activity in KILLED_IN} == KILLED_IN, f"a kill missed its step: {retried}"
    outputs = {o.run_output_name: o for o in status.run_outputs}
    assert {name: o.provisioning_state for name, o in outputs.items()} == dict.fromkeys(
        ("vhd", "managed", "gallery"), "Succeeded"
    )
    vhd = await download_vhd(outputs["vhd"].artifact_uri, tmp_path / "killed-late.vhd")
    assert debugfs(vhd, "cat /etc/kiln-release").encode() == RELEASE
    await assert_clean(local_builds, build, kept={"log", "output"})


async def test_three_builds_at_once_do_not_collide(local_builds: LocalBuilds, tmp_path: Path) -> None:
    tokens = [f"token-{i}" for i in range(3)]
    builds = [
        await local_builds.start(template([shell("token", f"echo {t} | sudo tee /etc/kiln-token")]), prefix=t)
        for t in tokens
    ]
    statuses = await asyncio.gather(*(local_builds.finish(b) for b in builds))
    assert [s.run_state for s in statuses] == [RunState.SUCCEEDED] * 3, [s.message for s in statuses]
    vms = [vm for b in builds for vm in b.vms.values()]
    assert (
        len({vm.folder for vm in vms}) == len({vm.address for vm in vms}) == len({vm.pid_namespace for vm in vms}) == 3
    )
    for token, build, status in zip(tokens, builds, statuses, strict=True):
        log = await local_builds.log(status)
        assert [t for t in tokens if t in log] == [token]
        vhd = await download_vhd(status.run_outputs[0].artifact_uri, tmp_path / f"{token}.vhd")
        assert debugfs(vhd, "cat /etc/kiln-token") == f"{token}\n"
        await assert_clean(local_builds, build, kept={"log", "output"})


async def test_bad_input_is_refused_and_leaves_nothing(local_builds: LocalBuilds) -> None:
    script_uri, script_sha = local_builds.files.add("script.sh", b"#!/bin/sh\necho hello\n")
    wrong_sha = "0" * 64
    ubuntu = {**SOURCE, "publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts-gen2"}
    cases = {
        "unknown image": (
            template([shell("hello", "echo hello")], source=ubuntu),
            "Canonical:0001-com-ubuntu-server-jammy:22_04-lts-gen2 is not an image the local cloud has",
        ),
        "sha256 mismatch": (
            template([{"type": "Shell", "name": "script", "scriptUri": script_uri, "sha256Checksum": wrong_sha}]),
            (
                f"properties.customize[0].scriptUri: sha256 of {script_uri} is {script_sha}, "
                f"but the template's sha256Checksum is {wrong_sha}"
            ),
        ),
        "File outside /tmp": (
            template([{"type": "File", "sourceUri": script_uri, "destination": "/etc/script.sh"}]),
            "properties.customize[0].destination: '/etc/script.sh': on Linux the File customizer can only write under /tmp",
        ),
    }

    async def refused(body: dict, message: str) -> None:
        build = await local_builds.start(body, prefix="bad")
        status = await local_builds.finish(build)
        assert status.run_state == RunState.FAILED
        assert message in status.message
        assert not build.vms
        await assert_clean(local_builds, build, kept=set())

    await check_all({case: refused(body, message) for case, (body, message) in cases.items()})
