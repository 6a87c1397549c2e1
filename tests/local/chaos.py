"""The local half of the chaos soak (``tests/chaos.py``): real local builds on the cached base, with worker processes
of their own (``tests.local.local_worker``) and an Azurite of their own.

The site's faults: Azurite, which holds every build's staged files, logs and outputs, is stopped and started again;
a build VM's SSH connections are cut (its sshd session processes killed) while a step uses them. A build meant to
succeed in part has a second VHD target whose blob someone else wrote first, which AIB refuses to overwrite. Each
ended build is checked for its token in its VHD (read with debugfs) and for anything temporary of it left on the
machine: processes, mounts, folders, cgroups, loopback listeners, loop devices, records, blobs.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.storage.blob.aio import BlobClient, ContainerClient
from temporalio.client import Client, WorkflowHandle

from activities.clouds.base import PermanentError
from activities.clouds.local import azurite
from activities.clouds.local.azurite import start_azurite
from activities.clouds.local.records import ResourceStore
from tests.chaos import MARKER, Fault, Planned, Storage, customizers, cut_ssh
from tests.local.builds import LocalBuilds, debugfs, download_vhd, serving, template, worker_process
from tests.local.vms import TEST_HOME
from tests.services import free_port
from workflows.models import RunState

# The blob a build meant to succeed in part finds written already at its second target's uri.
TAKEN = b"written by someone else\n"


@dataclass
class LocalSite:
    builds: LocalBuilds
    storage: Storage
    taken: str  # the uri of that blob

    cloud = "local"
    every = (8.0, 30.0)  # a build takes a minute or two

    @property
    def client(self) -> Client:
        return self.builds.client

    def template(self, kind: str, token: str, rng: random.Random) -> dict[str, Any]:
        distribute = [{"type": "VHD", "runOutputName": "vhd"}]
        if kind == "partial":
            distribute.append({"type": "VHD", "runOutputName": "taken", "uri": self.taken})
        return template(customizers(kind, token, rng), distribute)

    async def start(self, template: dict[str, Any], prefix: str, task_queue: str) -> tuple[WorkflowHandle, Any]:
        build = await self.builds.start(template, prefix=prefix, task_queue=task_queue)
        return build.handle, build

    def worker(self, task_queue: str) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
        builds = self.builds
        log = builds.files.folder.parent / "worker.log"  # every worker's, in the soak's folder
        return worker_process(builds.client, builds.state, builds.storage.endpoint, task_queue, log=log)

    def faults(self) -> dict[str, Fault]:
        return {"Azurite restarts": self.storage.restart, "SSH drops": self.drop_ssh}

    async def drop_ssh(self, planned: list[Planned], rng: random.Random) -> bool:
        """Cut the SSH connections of a VM of a build still running."""
        leaders = []
        for p in planned:
            if p.status is not None:
                continue  # ended
            for vm in list(p.build.vms.values()):
                try:
                    leaders.append(self.builds.cloud.vms.leader(vm.name))
                except (PermanentError, FileNotFoundError):
                    continue  # not running (any more)
        return cut_ssh(leaders)

    async def check(self, planned: Planned, folder: Path) -> list[str]:
        build, status = planned.build, planned.status
        assert status is not None
        if build.watcher is not None:
            build.watcher.cancel()
        problems = []
        if status.run_state in (RunState.SUCCEEDED, RunState.PARTIALLY_SUCCEEDED):
            outputs = {o.run_output_name: o for o in status.run_outputs}
            problems += await self._holds_token(
                outputs["vhd"].artifact_uri, planned.token, folder / f"{build.build_id}.vhd"
            )
            if planned.kind == "partial":
                if outputs["taken"].provisioning_state != "Failed":
                    problems.append(f"its target 'taken' ended {outputs['taken'].provisioning_state}, not Failed")
                if await self._taken_now() != TAKEN:
                    problems.append(f"the blob that was at {self.taken} before the build is changed or gone")
        problems += await self.builds.leftovers(build)
        kept = set(self.builds.kept(build)) - {"log", "output"}
        return problems + [f"records of role {role} kept" for role in sorted(kept)]

    async def _holds_token(self, uri: str, token: str, path: Path) -> list[str]:
        vhd = await download_vhd(uri, path)
        try:
            held = (await asyncio.to_thread(debugfs, vhd, f"cat {MARKER}")).strip()
        finally:
            vhd.unlink(missing_ok=True)
        return [] if held == token else [f"the image holds {held!r} at {MARKER}, not its token"]

    async def _taken_now(self) -> bytes | None:
        account = self.taken.split("/")[3]
        async with BlobClient.from_blob_url(self.taken, credential=azurite.credential(account)) as blob:
            return await (await blob.download_blob()).readall() if await blob.exists() else None


@asynccontextmanager
async def environment(client: Client, folder: Path) -> AsyncIterator[LocalSite]:
    """Local builds on the cached base, with an Azurite of their own the soak may restart, holding the blob a
    build meant to succeed in part cannot overwrite."""
    (folder / "files").mkdir()
    storage = Storage(await start_azurite(location=folder / "azurite", port=free_port()))
    try:
        container = f"{azurite.account_url(azurite.STAGING_ACCOUNT, base=storage.azurite.endpoint)}/taken"
        credential = azurite.credential(azurite.STAGING_ACCOUNT)
        async with ContainerClient.from_container_url(container, credential=credential) as client_of_container:
            await client_of_container.create_container()
            await client_of_container.upload_blob("image.vhd", TAKEN)
        taken = f"{container}/image.vhd"
        store = ResourceStore(TEST_HOME / "resources.db")
        async with serving(client, storage.azurite.endpoint, TEST_HOME, store, folder / "files") as builds:
            yield LocalSite(builds, storage, taken)
    finally:
        await storage.azurite.stop()
