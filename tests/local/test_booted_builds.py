"""Real local builds whose image is booted for real: the validation VM is the captured disk in QEMU.

Each boot is about a minute under TCG, so this file holds the few builds that need one: what customizers
installed works once the image boots (a service, a newer kernel), and an image that cannot boot fails its build
with its console kept.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from activities.clouds.local.azurite import Azurite
from activities.clouds.local.base_image import DEBIAN_MIRROR
from activities.clouds.local.records import ResourceStore
from tests.local.builds import Build, LocalBuilds, host_processes, serving, shell, template, worker_process
from tests.workflows.harness import check_all
from workflows.models import RunState

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(os.geteuid() != 0, reason="local builds need root"),
    pytest.mark.timeout(900),  # a build, then a boot under TCG: minutes on a busy machine
]

# The Linux customizer a new AIB user writes first, as it stands in AIB's own examples.
WEB = shell(
    "web",
    "sudo apt-get install -y nginx",
    "sudo systemctl enable nginx",
    "sudo systemctl restart nginx",
    "curl -fsS http://localhost/",
)
KERNEL = shell(
    "kernel",
    f"echo 'deb {DEBIAN_MIRROR} bookworm-backports main' | sudo tee /etc/apt/sources.list.d/backports.list",
    "sudo apt-get update -q",
    "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports linux-image-cloud-amd64",
    "echo \"kernel installed: $(readlink /vmlinuz | sed 's|.*/vmlinuz-||')\"",
)


@pytest_asyncio.fixture
async def booted_builds(
    client: Client, azurite: Azurite, state: Path, store: ResourceStore, tmp_path: Path
) -> AsyncIterator[LocalBuilds]:
    """A worker on the local cloud that boots every image it captures."""
    (tmp_path / "files").mkdir()
    async with serving(client, azurite.endpoint, state, store, tmp_path / "files", boot_check=True) as builds:
        yield builds


async def test_what_customizers_installed_runs_when_the_image_boots(booted_builds: LocalBuilds) -> None:
    """nginx, enabled in the build VM, serves in the booted image; a kernel installed in the build VM (which runs
    on the host's) is the one the image boots."""
    validators = [
        shell("serves", "curl -fsS http://localhost/ | grep -o 'Welcome to nginx!'", "systemctl is-enabled nginx"),
        shell("kernel", 'echo "kernel running: $(uname -r)"'),
    ]
    build = await booted_builds.start(template([WEB, KERNEL], validate={"inVMValidations": validators}), prefix="web")
    status = await booted_builds.finish(build)
    assert status.run_state == RunState.SUCCEEDED, status.message
    customization = await booted_builds.log(status)
    assert "Welcome to nginx!" in customization  # the customizer's own curl, inside the build VM
    installed = customization.split("kernel installed: ", 1)[1].split()[0]
    validation = await booted_builds.log(status, "validation.log")
    assert "    azure-arm: Welcome to nginx!" in validation
    assert "    azure-arm: enabled" in validation
    assert f"    azure-arm: kernel running: {installed}" in validation
    assert "booted to SSH in" in await booted_builds.log(status, "console.log")
    assert await booted_builds.leftovers(build) == []


async def test_an_image_that_cannot_boot_fails_its_build_and_keeps_the_console(booted_builds: LocalBuilds) -> None:
    """A customizer breaks /etc/fstab: the build VM (a container) never mounts it, the booted image does and
    drops to emergency mode. With and without validators the build fails at the boot, console kept."""
    breaks = shell("fstab", "echo 'tmpfs /mnt tmpfs defaults,nosuchoption 0 0' | sudo tee -a /etc/fstab")

    async def fails(validate: dict) -> None:
        build = await booted_builds.start(template([breaks], validate=validate), prefix="noboot")
        status = await booted_builds.finish(build)
        assert status.run_state == RunState.FAILED
        assert status.message.startswith("create validation VM failed: the image did not boot")
        console = await booted_builds.log(status, "console.log")
        assert "Failed to mount mnt.mount" in console
        assert await booted_builds.leftovers(build) == []

    await check_all({"boot check": fails({}), "validators": fails({"inVMValidations": [shell("never", "true")]})})


async def booting(builds: LocalBuilds, build: Build, timeout: float = 600) -> None:
    """Wait until the build's validation VM runs: a QEMU process of its folder."""
    async with asyncio.timeout(timeout):
        while True:
            folders = [vm.folder for vm in build.vms.values() if vm.folder.parent.name == "qemu"]
            if any(str(f) in command for f in folders for _, _, command in host_processes()):
                return
            await asyncio.sleep(0.5)


async def test_a_cancel_a_timeout_or_a_dead_worker_during_the_boot_check_leaves_nothing(
    booted_builds: LocalBuilds,
) -> None:
    """While the captured image boots: a cancel and the deadline end the build with no QEMU, mount or overlay left;
    a worker killed then leaves the boot to the next worker, which finishes the build."""
    step = shell("marker", "echo booted | sudo tee /etc/kiln-marker")

    async def canceled() -> None:
        build = await booted_builds.start(template([step]), prefix="cancel-boot")
        await booting(booted_builds, build)
        await build.handle.cancel()
        status = await booted_builds.finish(build)
        assert status.run_state == RunState.CANCELED
        assert status.message.startswith("Canceled during create validation VM")
        assert await booted_builds.leftovers(build) == []

    async def timed_out() -> None:
        build = await booted_builds.start(template([step]), prefix="timeout-boot")
        await booting(booted_builds, build)
        await booted_builds.set_deadline(build, 0)
        status = await booted_builds.finish(build)
        assert status.run_state == RunState.FAILED
        assert status.message.startswith("The build timed out during create validation VM")
        assert await booted_builds.leftovers(build) == []

    async def worker_killed() -> None:
        queue = f"{booted_builds.task_queue}-process"
        endpoint = booted_builds.storage.endpoint
        client, state = booted_builds.client, booted_builds.state
        async with worker_process(client, state, endpoint, queue, boot_check=True) as first:
            build = await booted_builds.start(template([step]), prefix="killed-boot", task_queue=queue)
            await booting(booted_builds, build)
            first.send_signal(signal.SIGKILL)
            await first.wait()
        async with worker_process(client, state, endpoint, queue, boot_check=True):
            status = await booted_builds.finish(build)
        assert status.run_state == RunState.SUCCEEDED, status.message
        assert "booted to SSH in" in await booted_builds.log(status, "console.log")
        assert await booted_builds.leftovers(build) == []

    await check_all({"cancel": canceled(), "timeout": timed_out(), "worker killed": worker_killed()})
