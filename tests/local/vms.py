"""Helpers for the tests and benches that use real local VMs: the test state folder, templates and builds of a
Debian base, and ways to look inside a VM.

The Debian base is made once (mmdebstrap, about a minute) into a state folder kept between sessions,
``$KILN_TEST_HOME`` or ``/var/tmp/kiln-test``; every test after that boots VMs on it from the cache.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from activities.clouds.local import LocalCloud
from activities.clouds.local.outputs import LocalImage
from workflows.models import BuildContext, BuildVm, ResolvedSource, Staging
from workflows.template import ImageTemplate, parse_template

TEST_HOME = Path(os.environ.get("KILN_TEST_HOME", "/var/tmp/kiln-test"))


def debian_template(**source: str) -> ImageTemplate:
    return parse_template(
        {
            "location": "westeurope",
            "properties": {
                "source": {
                    "type": "PlatformImage",
                    "publisher": "Debian",
                    "offer": "debian-12",
                    "sku": "12-gen2",
                    "version": "latest",
                    **source,
                },
                "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
            },
        }
    )


def new_build(prefix: str = "t") -> BuildContext:
    return BuildContext(
        build_id=f"{prefix}-{uuid.uuid4().hex[:8]}", template_name=prefix, location="westeurope", cloud="local"
    )


STAGING = Staging(resource_group_id="local-test", created_group=False, storage_uri="", log_uri_prefix="")


class ImagesOnlyStorage:
    """Stands in for LocalStorage where a test needs only ``locate_image``: images it registers by id."""

    def __init__(self) -> None:
        self.images: dict[str, LocalImage] = {}

    async def locate_image(self, image_id: str) -> LocalImage:
        return self.images[image_id]

    async def check_targets(self, template: ImageTemplate, source: ResolvedSource) -> None:
        """VM tests distribute nothing, so every target is acceptable."""

    async def close(self) -> None:
        pass


MakeVm = Callable[..., Awaitable[tuple[BuildContext, BuildVm]]]


async def guest_run(cloud: LocalCloud, vm_name: str, command: str) -> str:
    """Run ``command`` as root inside the VM's namespaces from the host: a look that needs no login."""
    pid = cloud.vms.leader(vm_name)
    process = await asyncio.create_subprocess_exec(
        "nsenter",
        "--target",
        str(pid),
        "--all",
        "sh",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return output.decode()


async def run_to_end(guest, run_id: str, script: str, *, as_root: bool = False) -> tuple[bytes, int]:
    """Start a script and read it to its end in small polls, as the customize activity does."""
    await guest.start_script(run_id, script, as_root=as_root)
    output, offset = b"", 0
    while True:
        progress = await guest.poll_script(run_id, offset)
        output += progress.output
        offset += len(progress.output)
        if progress.exit_code is not None:
            return output, progress.exit_code
        await asyncio.sleep(0.05)


async def host(*argv: str) -> str:
    """Run a host program to its end and return what it printed; it must succeed."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    output, errors = await process.communicate()
    assert process.returncode == 0, f"{argv}: {errors.decode(errors='replace')}"
    return output.decode()


def pid_namespace_members(pid: int) -> list[int]:
    """Every process in the PID namespace of ``pid`` (a VM's PID 1: every process of the VM)."""
    namespace = os.stat(f"/proc/{pid}/ns/pid").st_ino
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "pid").st_ino == namespace:
                    members.append(int(entry.name))
            except (FileNotFoundError, PermissionError):
                pass  # gone meanwhile, or another user namespace's
    return members
