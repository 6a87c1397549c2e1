"""The clouds kiln builds on, by name: the task queue each one serves, how a worker makes it, and what its
worker starts beside itself with ``--dev``.

A build is sent to a cloud by the task queue it is started on, so an AIB template stays exactly as AIB takes it;
a new cloud is one entry here and one folder under ``activities/clouds/``. Nothing here imports a cloud until
it is made, so the workflow (which reads queue names) and the CLI stay free of the clouds' SDKs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from activities.clouds.base import Cloud

QUEUE_PREFIX = "kiln-"


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker's command line says of its cloud (a cloud ignores what is not its own)."""

    boot_check: bool = True  # local: boot every captured image, validators or not
    allow_any_source: bool = False  # azure: without KILN_EGRESS_IP, open the build VM's NSG to any source


@dataclass(frozen=True)
class CloudEntry:
    """One cloud: its name, what it is for (``--help`` says it), how to make it from the environment and the
    worker's options, and the services a ``--dev`` worker of it starts first (Azurite for the local cloud)."""

    name: str
    summary: str
    make: Callable[[WorkerOptions], Awaitable[Cloud]]
    dev_services: Callable[[], AbstractAsyncContextManager[None]] = nullcontext

    @property
    def task_queue(self) -> str:
        return task_queue(self.name)


async def _make_local(options: WorkerOptions) -> Cloud:
    from activities.clouds.local import LocalCloud
    from activities.clouds.local.records import ResourceStore
    from activities.clouds.local.storage import LocalStorage
    from activities.clouds.state import state_dir

    store = ResourceStore(state_dir() / "resources.db")
    return LocalCloud(storage=LocalStorage(store=store), store=store, boot_check=options.boot_check)


@asynccontextmanager
async def _local_dev_services() -> AsyncIterator[None]:
    from activities.clouds.local.azurite import start_azurite
    from activities.clouds.state import state_dir

    azurite = await start_azurite(location=state_dir() / "azurite")
    try:
        yield
    finally:
        await azurite.stop()


async def _make_azure(options: WorkerOptions) -> Cloud:
    from activities.clouds.azure import AzureCloud

    return AzureCloud.from_environment(allow_any_source=options.allow_any_source)


CLOUDS: dict[str, CloudEntry] = {
    entry.name: entry
    for entry in (
        CloudEntry("local", "this machine: build VMs, VHDs and a gallery in Azurite", _make_local, _local_dev_services),
        CloudEntry("azure", "Azure, through Resource Manager, as AIB builds", _make_azure),
    )
}


def task_queue(cloud: str) -> str:
    """The task queue builds for ``cloud`` are started on (``kiln-local``)."""
    return f"{QUEUE_PREFIX}{cloud}"


def cloud_of(queue: str) -> str:
    """The cloud a task queue builds on; a queue of no known cloud names itself (a test's own queue)."""
    name = queue.removeprefix(QUEUE_PREFIX)
    return name if name in CLOUDS and queue.startswith(QUEUE_PREFIX) else queue
