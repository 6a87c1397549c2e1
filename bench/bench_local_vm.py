"""Local VM figures: a build VM's create to SSH-ready (systemd, cloud-init done), the capture of a ~2 GiB image
into a bootable disk (partitions, boot loader, fixed VHD), and that disk's boot to SSH in QEMU (KVM or TCG).

    python bench/bench_local_vm.py [--boots 5]

Runs as root on the state folder the local tests use ($KILN_TEST_HOME, else /var/tmp/kiln-test), so the Debian
base is made only if no earlier run made it (that first make is timed and printed apart).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.clouds.local import LocalCloud  # noqa: E402
from activities.clouds.local.images import resolve_platform_image  # noqa: E402
from activities.clouds.local.qemu import accelerator  # noqa: E402
from activities.clouds.local.records import ResourceStore  # noqa: E402
from tests.fixtures import connect
from tests.local.vms import STAGING, TEST_HOME, debian_template, run_to_end  # noqa: E402
from workflows.models import BuildContext, CaptureSpec, VmSpec  # noqa: E402

# About 1.5 GiB on top of the ~550 MiB base: incompressible data plus many small files, like a real image. The
# deprovision step that precedes every capture ends with `sync` (as AIB's does), so the capture is timed after one.
GROW_TO_2GIB = (
    "sudo sh -c 'head -c 900M /dev/urandom > /var/lib/bulk && cp -a /usr /opt/usr1 && cp -a /usr /opt/usr2 && sync'"
)


def new_build() -> BuildContext:
    return BuildContext(
        build_id=f"bench-{uuid.uuid4().hex[:8]}", template_name="bench", location="westeurope", cloud="local"
    )


async def main(boots: int) -> None:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    # VMs and capture only: no storage (Azurite) is needed, so none is given.
    cloud = LocalCloud(storage=None, store=ResourceStore(TEST_HOME / "resources.db"), state=TEST_HOME)  # type: ignore[arg-type]
    started = time.monotonic()
    build = new_build()
    source = await resolve_platform_image(
        cloud.images, debian_template().properties.source, state=TEST_HOME, location=build.location
    )
    print(f"resolve Debian 12 base ({source.exact_version}): {time.monotonic() - started:.2f} s")

    ready, first_command = [], []
    for _ in range(boots):
        build = new_build()
        spec = VmSpec(
            name=f"{build.build_id}-build", purpose="build", image_id=source.image_id, source=source, vm_profile={}
        )
        started = time.monotonic()
        vm = await cloud.create_vm(build, STAGING, spec)
        ready.append(time.monotonic() - started)
        async with connect(cloud, build, vm) as guest:
            await run_to_end(guest, "true", "true")
        first_command.append(time.monotonic() - started)
        await cloud.delete_vm(build, vm.name)
    print(f"create to SSH-ready: median {statistics.median(ready):.3f} s, max {max(ready):.3f} s ({boots} VMs)")
    print(f"create to first command done over SSH: median {statistics.median(first_command):.3f} s")

    build = new_build()
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=source.image_id, source=source, vm_profile={}
    )
    vm = await cloud.create_vm(build, STAGING, spec)
    try:
        async with connect(cloud, build, vm) as guest:
            output, exit_code = await run_to_end(guest, "grow", GROW_TO_2GIB + " && sudo du -sxm / | cut -f1")
            assert exit_code == 0, output
        started = time.monotonic()
        image = await cloud.capture_image(build, STAGING, vm, CaptureSpec(name=f"{build.build_id}-image"))
        seconds = time.monotonic() - started
        print(f"capture of a {output.decode().split()[-1]} MiB image to a bootable fixed VHD: {seconds:.2f} s")
        print(
            f"VHD: used {image.used_bytes / 2**20:.0f} MiB of {image.size_bytes / 2**20:.0f} MiB virtual "
            f"({image.used_bytes} / {image.size_bytes} bytes)"
        )
        validation = spec.model_copy(update={"name": f"{build.build_id}-validation", "purpose": "validation"})
        try:
            _, boot_seconds = await cloud.qemu.create(build, validation, Path(urlparse(image.uri).path))
            print(f"boot of that disk to SSH ({await accelerator(TEST_HOME)}): {boot_seconds:.1f} s")
        finally:
            await cloud.qemu.delete(validation.name)
            await cloud.delete_image(build, f"{build.build_id}-image")
    finally:
        await cloud.delete_vm(build, vm.name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5, help="VMs to boot for the SSH-ready figure")
    asyncio.run(main(parser.parse_args().boots))
