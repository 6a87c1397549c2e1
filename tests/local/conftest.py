"""Real local VMs on this machine.

The Debian base is made once (mmdebstrap, about a minute) into a state folder kept between sessions,
``$KILN_TEST_HOME`` or ``/var/tmp/kiln-test``; every test after that boots VMs on it in well under a second.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from activities.clouds.local import LocalCloud
from activities.clouds.local.outputs import LocalImage
from activities.clouds.local.records import ResourceStore
from workflows.models import BuildContext, BuildVm, ResolvedSource, Staging, VmSpec
from workflows.template import ImageTemplate, parse_template

TEST_HOME = Path(os.environ.get("KILN_TEST_HOME", "/var/tmp/kiln-test"))
VM_TEST_MODULES = {"test_vm.py", "test_images.py", "test_capture.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Only root can make namespaces, mounts and loopback addresses. A missing program is no reason to skip:
    # tests/test_setup.py names it first, and the VM that needs it fails at once, saying which.
    if os.geteuid() != 0:
        for item in items:
            if item.path.parent == Path(__file__).parent and item.path.name in VM_TEST_MODULES:
                item.add_marker(pytest.mark.skip(reason="local VMs need root"))


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


@pytest.fixture(scope="session")
def state() -> Path:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    return TEST_HOME


@pytest.fixture(scope="session")
def store(state: Path) -> ResourceStore:
    return ResourceStore(state / "resources.db")


@pytest.fixture(scope="session")
def storage() -> ImagesOnlyStorage:
    return ImagesOnlyStorage()


@pytest.fixture(scope="session")
def cloud(state: Path, store: ResourceStore, storage: ImagesOnlyStorage) -> LocalCloud:
    return LocalCloud(storage=storage, store=store, state=state)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="session")
async def debian(cloud: LocalCloud) -> ResolvedSource:
    """Debian 12 (gen2), made on the first run and then taken from the cache."""
    return await cloud.resolve_source(new_build("base"), debian_template())


MakeVm = Callable[..., Awaitable[tuple[BuildContext, BuildVm]]]


@pytest_asyncio.fixture
async def make_vm(cloud: LocalCloud, debian: ResolvedSource) -> AsyncIterator[MakeVm]:
    """Boots VMs (on Debian 12 unless told otherwise) and deletes each one after the test."""
    made: list[tuple[BuildContext, str]] = []

    async def make(
        *, image_id: str | None = None, source: ResolvedSource | None = None, vm_size: str = ""
    ) -> tuple[BuildContext, BuildVm]:
        build = new_build()
        spec = VmSpec(
            name=f"{build.build_id}-build",
            purpose="build",
            image_id=image_id or debian.image_id,
            source=source or debian,
            vm_profile={"vmSize": vm_size},
        )
        made.append((build, spec.name))
        return build, await cloud.create_vm(build, STAGING, spec)

    yield make
    for build, name in made:
        await cloud.delete_vm(build, name)


async def guest_run(cloud: LocalCloud, vm_name: str, command: str) -> str:
    """Run ``command`` as root inside the VM's namespaces from the host: a look that needs no login."""
    pid = int(cloud.vms.folder(vm_name).pid_file.read_text().split()[0])
    process = await asyncio.create_subprocess_exec(
        "nsenter",
        "--target",
        str(pid),
        "--mount",
        "--uts",
        "--ipc",
        "--pid",
        "--root",
        "--wd",
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
