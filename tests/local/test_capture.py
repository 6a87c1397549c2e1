"""Capture: a stopped VM written as a bootable fixed VHD (GPT with an ESP for Gen2, MBR with BIOS GRUB for Gen1),
and VMs made again from what a build captured. Booting those disks for real is tests/local/test_boot.py's."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from urllib.parse import urlparse

import pytest

from activities.clouds.base import PermanentError
from activities.clouds.local import LocalCloud
from activities.clouds.local.disks import ESP_TYPE, LINUX_ROOT_X86_64, root_partition
from activities.clouds.local.outputs import LocalImage
from activities.clouds.local.records import ResourceStore
from tests.fixtures import connect, deprovision_script
from tests.local.vms import (
    STAGING,
    ImagesOnlyStorage,
    MakeVm,
    guest_run,
    host,
    new_build,
    run_to_end,
)
from workflows.models import BuildContext, BuildVm, CapturedImage, CaptureSpec, ResolvedSource
from workflows.template import parse_template

pytestmark = pytest.mark.local

MIB = 1 << 20
MARKER = "made by a customizer"
FSTAB_LINE = "tmpfs /var/cache/kiln tmpfs defaults 0 0"


async def customize_and_capture(
    cloud: LocalCloud, build: BuildContext, vm: BuildVm, *, os_disk_size_gb: int = 0
) -> CapturedImage:
    async with connect(cloud, build, vm) as guest:
        script = f"echo '{MARKER}' | sudo tee /etc/kiln-marker; echo '{FSTAB_LINE}' | sudo tee -a /etc/fstab"
        _, exit_code = await run_to_end(guest, "marker", script)
        assert exit_code == 0
        _, exit_code = await run_to_end(guest, "deprovision", await deprovision_script(guest, vm), as_root=True)
        assert exit_code == 0
    return await cloud.capture_image(
        build, STAGING, vm, CaptureSpec(name=f"{build.build_id}-image", os_disk_size_gb=os_disk_size_gb)
    )


async def sfdisk_table(path: Path) -> dict:
    raw = path.with_suffix(".check.raw")
    raw.symlink_to(path)  # sfdisk takes the VHD's footer for the disk's last sector; the table reads the same
    try:
        return json.loads(await host("sfdisk", "--json", str(raw)))["partitiontable"]
    finally:
        raw.unlink()


@pytest.mark.parametrize("generation", ["V2", "V1"])
async def test_capture_writes_a_bootable_fixed_vhd_holding_what_the_scripts_made(
    cloud: LocalCloud, store: ResourceStore, make_vm: MakeVm, debian: ResolvedSource, generation: str
):
    source = debian.model_copy(update={"hyper_v_generation": generation})
    build, vm = await make_vm(source=source)
    image = await customize_and_capture(cloud, build, vm)
    path = Path(urlparse(image.uri).path)
    try:
        assert image.uri.startswith("file:///") and path.is_file() and image.hyper_v_generation == generation
        info = json.loads(await host("qemu-img", "info", "-f", "vpc", "--output=json", str(path)))
        assert info["virtual-size"] in (image.size_bytes, image.size_bytes + 512)  # qemu-img counts the footer
        assert image.size_bytes == debian.size_bytes == 30 << 30  # the source's disk, as on Azure
        assert path.stat().st_size == image.size_bytes + 512
        assert 0 < image.used_bytes < image.size_bytes // 20  # sparse: only what the image holds is written
        with path.open("rb") as vhd:
            vhd.seek(-512, 2)
            footer = vhd.read()
        assert footer[:8] == b"conectix"
        assert struct.unpack(">Q", footer[48:56])[0] == image.size_bytes  # current size
        assert struct.unpack(">I", footer[60:64])[0] == 2  # disk type: fixed
        checksum = struct.unpack(">I", footer[64:68])[0]
        assert checksum == ~sum(footer[:64] + bytes(4) + footer[68:]) & 0xFFFFFFFF

        table = await sfdisk_table(path)
        root = root_partition(path)
        if generation == "V2":
            assert table["label"] == "gpt"
            esp, linux = table["partitions"]
            assert esp["type"] == ESP_TYPE and esp["start"] == MIB // 512
            assert linux["type"] == LINUX_ROOT_X86_64 and linux["start"] * 512 == root.offset
            esp_files = await host("mdir", "-b", "-i", f"{path}@@{MIB}", "::/EFI/BOOT")
            assert {"BOOTX64.EFI", "grubx64.efi", "grub.cfg"} <= {Path(f).name for f in esp_files.split()}
        else:
            assert table["label"] == "dos"
            [linux] = table["partitions"]
            assert linux["type"] == "83" and linux.get("bootable") and linux["start"] * 512 == root.offset
            with path.open("rb") as disk:
                mbr = disk.read(512)
            assert mbr[510:] == b"\x55\xaa" and struct.unpack_from("<Q", mbr, 0x5C)[0] == 1  # GRUB's core at sector 1
        filesystem = f"{path}?offset={root.offset}"
        await host("e2fsck", "-fn", filesystem)
        assert await host("debugfs", "-R", "cat /etc/kiln-marker", filesystem) == f"{MARKER}\n"
        fstab = await host("debugfs", "-R", "cat /etc/fstab", filesystem)
        uuid = (await host("debugfs", "-R", "stats", filesystem)).split("Filesystem UUID:")[1].split()[0]
        assert fstab.startswith(f"UUID={uuid} / ext4 ")
        assert fstab.splitlines()[-1] == FSTAB_LINE  # a customizer's entry stays, behind the disk's own
        assert len(fstab.splitlines()) == (3 if generation == "V2" else 2)  # the root, the ESP on Gen2, and it
        assert "kiln-guest" not in await host("debugfs", "-R", "ls /var/lib", filesystem)
        assert vm.admin_user not in await host("debugfs", "-R", "ls /home", filesystem)
        assert store.get(image.id) is not None
    finally:
        await cloud.delete_image(build, f"{build.build_id}-image")
    assert not path.exists() and store.get(image.id) is None
    await cloud.delete_image(build, f"{build.build_id}-image")  # already gone: succeeds


async def test_os_disk_size_sets_the_virtual_size_and_can_only_grow(cloud: LocalCloud, make_vm: MakeVm):
    build, vm = await make_vm()
    image = await customize_and_capture(cloud, build, vm, os_disk_size_gb=40)
    try:
        assert image.size_bytes == 40 << 30
    finally:
        await cloud.delete_image(build, f"{build.build_id}-image")
    build, vm = await make_vm()
    with pytest.raises(PermanentError, match=r"osDiskSizeGB: 2 GB is smaller than the source image's 30 GB disk"):
        await customize_and_capture(cloud, build, vm, os_disk_size_gb=2)


async def test_build_vms_start_from_a_captured_image_and_from_a_managed_image_source(
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
        # A build VM made from a build's own capture starts from the root partition of its disk.
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
