"""Capture: a stopped VM written as a fixed VHD of ext4, and VMs booted again from what a build captured."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from urllib.parse import urlparse

import pytest

from activities.clouds.local import LocalCloud
from activities.clouds.local.outputs import LocalImage
from activities.clouds.local.records import ResourceStore
from tests.fixtures import connect, deprovision_script
from tests.local.vms import (
    STAGING,
    ImagesOnlyStorage,
    MakeVm,
    guest_run,
    new_build,
    run_to_end,
)
from workflows.models import BuildContext, BuildVm, CapturedImage, CaptureSpec
from workflows.template import parse_template

pytestmark = pytest.mark.local

MIB = 1 << 20
MARKER = "made by a customizer"


async def host(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, argv
    return output.decode()


async def customize_and_capture(
    cloud: LocalCloud, build: BuildContext, vm: BuildVm, *, os_disk_size_gb: int = 0
) -> CapturedImage:
    async with connect(cloud, build, vm) as guest:
        _, exit_code = await run_to_end(guest, "marker", f"echo '{MARKER}' | sudo tee /etc/kiln-marker")
        assert exit_code == 0
        _, exit_code = await run_to_end(guest, "deprovision", await deprovision_script(guest, vm), as_root=True)
        assert exit_code == 0
    return await cloud.capture_image(
        build, STAGING, vm, CaptureSpec(name=f"{build.build_id}-image", os_disk_size_gb=os_disk_size_gb)
    )


async def test_capture_writes_a_valid_fixed_vhd_holding_what_the_scripts_made(
    cloud: LocalCloud, store: ResourceStore, make_vm: MakeVm
):
    build, vm = await make_vm()
    image = await customize_and_capture(cloud, build, vm)
    path = Path(urlparse(image.uri).path)
    try:
        assert image.uri.startswith("file:///") and path.is_file()
        info = json.loads(await host("qemu-img", "info", "-f", "vpc", "--output=json", str(path)))
        assert info["virtual-size"] == image.size_bytes and image.size_bytes % MIB == 0
        assert path.stat().st_size == image.size_bytes + 512
        assert 0 < image.used_bytes < image.size_bytes

        with path.open("rb") as vhd:
            vhd.seek(-512, 2)
            footer = vhd.read()
        assert footer[:8] == b"conectix"
        assert struct.unpack(">Q", footer[48:56])[0] == image.size_bytes  # current size
        assert struct.unpack(">I", footer[60:64])[0] == 2  # disk type: fixed
        checksum = struct.unpack(">I", footer[64:68])[0]
        assert checksum == ~sum(footer[:64] + bytes(4) + footer[68:]) & 0xFFFFFFFF

        await host("e2fsck", "-fn", str(path))  # a clean ext4 filesystem right at the start of the disk
        assert await host("debugfs", "-R", "cat /etc/kiln-marker", str(path)) == f"{MARKER}\n"
        assert "kiln-guest" not in await host("debugfs", "-R", "ls /var/lib", str(path))
        assert vm.admin_user not in await host("debugfs", "-R", "ls /home", str(path))
        assert store.get(image.id) is not None and image.hyper_v_generation == "V2"
    finally:
        await cloud.delete_image(build, f"{build.build_id}-image")
    assert not path.exists() and store.get(image.id) is None
    await cloud.delete_image(build, f"{build.build_id}-image")  # already gone: succeeds


async def test_os_disk_size_sets_the_virtual_size(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    image = await customize_and_capture(cloud, build, vm, os_disk_size_gb=1)
    try:
        assert image.size_bytes == 1 << 30
    finally:
        await cloud.delete_image(build, f"{build.build_id}-image")


async def test_vms_boot_from_a_captured_image_and_from_a_managed_image_source(
    cloud: LocalCloud, storage: ImagesOnlyStorage, make_vm: MakeVm
):
    build, vm = await make_vm()
    image = await customize_and_capture(cloud, build, vm)
    managed_id = f"/subscriptions/local/resourceGroups/images/providers/Microsoft.Compute/images/{build.build_id}"
    storage.images[managed_id] = LocalImage(
        vhd_path=Path(urlparse(image.uri).path), exact_version="1.0.0", hyper_v_generation="V2"
    )
    made: list[tuple[BuildContext, BuildVm]] = []
    try:
        # The validation VM of a build starts from the build's own capture.
        made.append(await make_vm(image_id=image.id))
        assert await guest_run(cloud, made[-1][1].name, "cat /etc/kiln-marker") == f"{MARKER}\n"

        template = parse_template(
            {
                "location": "westeurope",
                "properties": {
                    "source": {"type": "ManagedImage", "imageId": managed_id},
                    "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
                },
            }
        )
        source = await cloud.resolve_source(new_build(), template)
        assert (source.image_id, source.exact_version, source.size_bytes) == (managed_id, "1.0.0", image.size_bytes)
        made.append(await make_vm(image_id=source.image_id, source=source))
        next_build, next_vm = made[-1]
        # The generalized image takes a new build user and host key, and keeps what the first build made.
        async with connect(cloud, next_build, next_vm) as guest:
            output, exit_code = await run_to_end(guest, "read", "cat /etc/kiln-marker; id -un")
        assert (output.decode(), exit_code) == (f"{MARKER}\n{next_vm.admin_user}\n", 0)
    finally:
        for made_build, made_vm in made:
            await cloud.delete_vm(made_build, made_vm.name)  # before their base, the unpacked capture, goes
        await cloud.delete_image(build, f"{build.build_id}-image")
