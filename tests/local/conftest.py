"""Real local VMs on this machine.

The Debian base is made once (mmdebstrap, about a minute) into a state folder kept between sessions,
``$KILN_TEST_HOME`` or ``/var/tmp/kiln-test``; every test after that boots VMs on it in well under a second.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from activities.clouds.local import LocalCloud
from activities.clouds.local.azurite import Azurite
from activities.clouds.local.records import ResourceStore
from tests.local.builds import LocalBuilds, serving
from tests.local.vms import STAGING, TEST_HOME, ImagesOnlyStorage, MakeVm, debian_template, new_build
from workflows.models import BuildContext, BuildVm, ResolvedSource, VmSpec

VM_TEST_MODULES = {"test_vm.py", "test_images.py", "test_capture.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Only root can make namespaces, mounts and loopback addresses. A missing program is no reason to skip:
    # tests/test_setup.py names it first, and the VM that needs it fails at once, saying which.
    if os.geteuid() != 0:
        for item in items:
            if item.path.parent == Path(__file__).parent and item.path.name in VM_TEST_MODULES:
                item.add_marker(pytest.mark.skip(reason="local VMs need root"))


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


@pytest_asyncio.fixture
async def local_builds(
    client: Client, azurite: Azurite, state: Path, store: ResourceStore, tmp_path: Path
) -> AsyncIterator[LocalBuilds]:
    """A worker on the local cloud (the session's state folder and Azurite) on a fresh task queue."""
    (tmp_path / "files").mkdir()
    async with serving(client, azurite.endpoint, state, store, tmp_path / "files") as builds:
        yield builds
