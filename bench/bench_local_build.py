"""The demo build end to end, each of its steps, and the same build by Packer's qemu builder beside it.

    python bench/bench_local_build.py [--runs 1] [--no-packer]

kiln builds examples/debian-golden.json as `make demo` does (nginx from the Debian registry, a scriptUri, a File,
a validator in the booted image; a VHD and a gallery in three regions). Then Packer (Debian's `packer`, its qemu
builder) applies the same customizations to the same Debian base: a disk of the base, booted under QEMU with a
NoCloud seed, the same provisioners and AIB's deprovision, shut down and written as qcow2. Packer validates
nothing and distributes nothing, so kiln's time up to its capture is printed too, for the like-for-like figure.

Runs as root on the state folder the local tests use ($KILN_TEST_HOME, else /var/tmp/kiln-test), so the Debian
base is made only if no earlier run made it (timed apart). Temporal (a dev server) and Azurite are started for the
run and stopped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncssh

from activities.clouds.local import LocalCloud
from activities.clouds.local.azurite import start_azurite
from activities.clouds.local.images import OFFERS, resolve_platform_image
from activities.clouds.local.qemu import CPU_MODELS, accelerator
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.vm import cloud_config
from activities.guest.keys import public_line
from activities.guest.linux import AIB_DEPROVISION
from tests.fixtures import connect, deprovision_script
from tests.local.builds import serving
from tests.local.vms import STAGING, TEST_HOME, new_build, run_to_end
from tests.services import free_loopback_address, free_port, start_dev_server
from workflows.models import BuildStatus, CaptureSpec, ResolvedSource, RunState, VmSpec
from workflows.template import parse_template

PROJECT = Path(__file__).resolve().parents[1]
DEMO = PROJECT / "examples" / "debian-golden.json"
DEMO_FILES = "http://127.0.0.1:8780/"
PACKER_SSH_PORT = 2222


def step_seconds(status: BuildStatus, name: str) -> float:
    step = next(s for s in status.steps if s.name == name and s.ended)
    return (step.ended - step.started).total_seconds()


def print_steps(status: BuildStatus, total: float, accel: str) -> float:
    """Each step's time; returns the time from the start to the end of the capture."""
    print(f"kiln, end to end (start to result): {total:.1f} s  [{status.run_state}]")
    for step in status.steps:
        seconds = (step.ended - step.started).total_seconds() if step.ended else float("nan")
        print(f"  {seconds:7.2f} s  {step.name}")
    capture = next(s for s in status.steps if s.name == "capture image" and s.ended)
    to_capture = (capture.ended - status.start_time).total_seconds() if status.start_time else float("nan")
    print(f"kiln, start to the end of capture (what Packer does): {to_capture:.1f} s")
    print(f"kiln, create build VM (create to SSH, cloud-init done): {step_seconds(status, 'create build VM'):.2f} s")
    print(f"kiln, create validation VM (boot to SSH, {accel}): {step_seconds(status, 'create validation VM'):.1f} s")
    return to_capture


def packer_provisioners(template: dict) -> list[dict]:
    """The template's customizers as Packer provisioners, then AIB's deprovision as AIB's Packer runs it."""
    local = lambda uri: str(PROJECT / "examples" / urlparse(uri).path.lstrip("/"))  # noqa: E731
    steps: list[dict] = [{"type": "shell", "inline": ["cloud-init status --wait"]}]  # kiln waits for it too
    for customizer in template["properties"]["customize"]:
        if customizer["type"] == "File":
            steps.append(
                {"type": "file", "source": local(customizer["sourceUri"]), "destination": customizer["destination"]}
            )
        elif "inline" in customizer:
            steps.append({"type": "shell", "inline": customizer["inline"]})
        else:
            steps.append({"type": "shell", "script": local(customizer["scriptUri"])})
    steps.append(
        {
            "type": "shell",
            "execute_command": "chmod +x {{ .Path }}; {{ .Vars }} sudo -E sh '{{ .Path }}'",
            "inline": AIB_DEPROVISION.splitlines(),
        }
    )
    return steps


async def base_disk(cloud: LocalCloud, source: ResolvedSource, work: Path) -> Path:
    """A bootable disk of the Debian base as a marketplace image is one: booted once, deprovisioned, captured."""
    build = new_build("packer-base")
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=source.image_id, source=source, vm_profile={}
    )
    vm = await cloud.create_vm(build, STAGING, spec)
    try:
        async with connect(cloud, build, vm) as guest:
            _, code = await run_to_end(guest, "deprovision", await deprovision_script(guest, vm), as_root=True)
            assert code == 0
        image = await cloud.capture_image(build, STAGING, vm, CaptureSpec(name=f"{build.build_id}-image"))
        disk = work / "debian-base.vhd"
        shutil.move(urlparse(image.uri).path, disk)
        await cloud.delete_image(build, f"{build.build_id}-image")
        return disk
    finally:
        await cloud.delete_vm(build, vm.name)


async def run_packer(template: dict, disk: Path, work: Path, accel: str) -> float:
    """Packer's build of the same customizations on ``disk``: its wall time."""
    seed = work / "seed"
    seed.mkdir()
    login = asyncssh.generate_private_key("ssh-ed25519")
    login.write_private_key(str(work / "id_ed25519"))
    config = cloud_config("packer", public_line(login), asyncssh.generate_private_key("ssh-ed25519"))
    (seed / "user-data").write_text("#cloud-config\n" + json.dumps(config))
    (seed / "meta-data").write_text(json.dumps({"instance-id": f"packer-{time.time_ns()}", "local-hostname": "packer"}))
    address = free_loopback_address(PACKER_SSH_PORT)
    builder = {
        "type": "qemu",
        "disk_image": True,
        "iso_url": str(disk),
        "iso_checksum": "none",
        "format": "qcow2",
        "skip_resize_disk": True,  # the fixed VHD's footer makes qemu see 512 bytes more: a resize would shrink
        "output_directory": str(work / "out"),
        "vm_name": "packer-debian.qcow2",
        "accelerator": accel,
        "headless": True,
        "memory": 2048,
        "cpus": 2,
        "net_device": "virtio-net",
        "disk_interface": "virtio",
        "machine_type": "q35",
        # The NoCloud seed over Packer's own HTTP server: the cloud kernel has no driver for Packer's SATA CD.
        "http_directory": str(seed),
        "http_bind_address": "127.0.0.1",
        # Packer's own -netdev would forward SSH on every host address: this one binds a loopback address only.
        "qemuargs": [
            ["-cpu", CPU_MODELS[accel]],
            ["-bios", "/usr/share/ovmf/OVMF.fd"],  # UEFI for the Gen2 disk (this Packer has no `firmware` key)
            ["-smbios", "type=1,serial=ds=nocloud-net;s=http://{{ .HTTPIP }}:{{ .HTTPPort }}/"],
            ["-netdev", f"user,id=user.0,hostfwd=tcp:{address}:{{{{ .SSHHostPort }}}}-:22"],
            ["-serial", f"file:{work / 'console.log'}"],
        ],
        "communicator": "ssh",
        "ssh_host": address,
        "host_port_min": PACKER_SSH_PORT,
        "host_port_max": PACKER_SSH_PORT,
        "ssh_username": "packer",
        "ssh_private_key_file": str(work / "id_ed25519"),
        "ssh_timeout": "15m",
    }
    (work / "template.json").write_text(
        json.dumps({"builders": [builder], "provisioners": packer_provisioners(template)})
    )
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        "packer", "build", "-color=false", "template.json", cwd=work,
        stdout=(work / "packer.out").open("wb"), stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    code = await process.wait()
    seconds = time.monotonic() - started
    if code != 0:
        tail = (work / "packer.out").read_text(errors="replace").splitlines()[-15:]
        raise SystemExit("packer build failed:\n" + "\n".join(tail))
    return seconds


async def main(runs: int, with_packer: bool) -> None:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    accel = await accelerator(TEST_HOME)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-", dir="/var/tmp") as scratch:
        azurite = await start_azurite(location=Path(scratch) / "azurite", port=free_port())
        try:
            async with (
                await start_dev_server() as env,
                serving(
                    env.client,
                    azurite.endpoint,
                    TEST_HOME,
                    ResourceStore(TEST_HOME / "resources.db"),
                    PROJECT / "examples",
                    boot_check=True,
                ) as builds,
            ):
                started = time.monotonic()
                debian = next(o for o in OFFERS if (o.offer, o.sku) == ("debian-12", "12-gen2"))
                base = await builds.cloud.images.resolve(debian, "latest")
                print(f"Debian 12 base {base.version}: {time.monotonic() - started:.2f} s (made now if not cached)")
                template = json.loads(DEMO.read_text().replace(DEMO_FILES, builds.files.url("")))
                gallery = next(d for d in template["properties"]["distribute"] if d["type"] == "SharedImage")
                gallery["galleryImageId"] = await builds.make_gallery()
                for run in range(runs):
                    print(f"-- run {run + 1} of {runs}")
                    started = time.monotonic()
                    status = await builds.finish(await builds.start(template, prefix="bench"))
                    if status.run_state != RunState.SUCCEEDED:
                        raise SystemExit(f"the build did not succeed: {status.message}")
                    to_capture = print_steps(status, time.monotonic() - started, accel)
                    if not with_packer:
                        continue
                    work = Path(scratch) / f"packer-{run}"
                    work.mkdir()
                    source = await resolve_platform_image(
                        builds.cloud.images,
                        parse_template(template).properties.source,
                        state=TEST_HOME,
                        location="westeurope",
                    )
                    seconds = await run_packer(template, await base_disk(builds.cloud, source, work), work, accel)
                    version = subprocess.run(["packer", "version"], capture_output=True, text=True).stdout.split()[1]
                    print(f"Packer {version} qemu builder, the same customizations on the same base: {seconds:.1f} s")
                    print(f"  against kiln's {to_capture:.1f} s to the end of capture: {seconds / to_capture:.1f}x")
        finally:
            await azurite.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="builds to run one after another")
    parser.add_argument("--no-packer", action="store_true", help="only kiln's build")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.runs, not arguments.no_packer))
