"""The Azure half of the chaos soak (``tests/chaos.py``): builds through the real Azure SDK clients, the ARM emulator
(blob traffic passes through it to Azurite), and real SSH guests, with worker processes of their own
(``tests.azure.azure_worker``).

The site's faults: Azurite, which holds the staging accounts' blobs and the logs, is stopped and started again; a
guest's SSH connections are cut while a step uses them; ARM answers a burst of requests (5 to 20 in a row, whatever
they ask) with 429 and Retry-After, or with 500. Every build distributes to a ManagedImage and to a pinned
gallery image version; a build meant to succeed in part replicates that version to a second region as well, where
replication fails, as a regional outage fails it.

The emulator's disks hold no bytes, so a build's customization is checked where the guest left it: the token its
script printed is in its customization log, once (a script re-run after a kill would print it twice). Left over is
anything in the subscription tagged with the build's id but its outputs (ManagedImage, and gallery version where
it succeeded), and any guest of its VMs still running or recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle

from activities.clouds.local import azurite
from activities.clouds.local.admin import read_log
from activities.clouds.local.azurite import start_azurite
from tests.arm_emulator import ArmEmulator
from tests.azure import guest_vms
from tests.azure.environment import GALLERY, LOCATION, RG, SUB, UBUNTU, Guests, azure_worker, make_arm, prepare
from tests.chaos import Fault, Planned, Storage, customizers, cut_ssh
from tests.services import free_port
from workflows.build import ImageBuildWorkflow
from workflows.models import RunState

# Where the gallery versions of builds meant to succeed in part fail to replicate.
FAILING_REGION = "centralus"
COMPUTE = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute"
BURST = (5, 20)  # requests answered with the burst's status, in a row


@dataclass
class AzureSite:
    client: Client
    arm: ArmEmulator
    guests: Guests
    storage: Storage
    secret: bytes
    folder: Path
    versions: itertools.count = field(default_factory=lambda: itertools.count(1))

    cloud = "azure"
    every = (2.0, 8.0)  # a build takes seconds

    @property
    def blob_account(self) -> str:
        return azurite.account_url(azurite.STAGING_ACCOUNT, base=self.storage.azurite.endpoint)

    def template(self, kind: str, token: str, rng: random.Random) -> dict[str, Any]:
        regions = [{"name": LOCATION}, *([{"name": FAILING_REGION}] if kind == "partial" else [])]
        return {
            "location": LOCATION,
            "properties": {
                "source": dict(UBUNTU),
                "customize": customizers(kind, token, rng),
                "distribute": [
                    {
                        "type": "ManagedImage",
                        "runOutputName": "managed",
                        "imageId": f"{COMPUTE}/images/{token}",
                        "location": LOCATION,
                    },
                    {
                        "type": "SharedImage",
                        "runOutputName": "gallery",
                        # Pinned, one version a build: builds at once choosing the next version would race.
                        "galleryImageId": f"{COMPUTE}/galleries/{GALLERY}/images/ubuntu/versions/1.0.{next(self.versions)}",
                        "targetRegions": regions,
                    },
                ],
            },
        }

    async def start(self, template: dict[str, Any], prefix: str, task_queue: str) -> tuple[WorkflowHandle, Any]:
        handle = await self.client.start_workflow(
            ImageBuildWorkflow.run, template, id=f"{prefix}-{uuid.uuid4().hex[:8]}", task_queue=task_queue
        )
        return handle, None

    def worker(self, task_queue: str) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
        return azure_worker(
            self.client, self.arm.base_url, self.blob_account, self.secret, task_queue, self.folder / "worker.log"
        )

    def faults(self) -> dict[str, Fault]:
        return {
            "Azurite restarts": self.storage.restart,
            "SSH drops": self.drop_ssh,
            "ARM 429 bursts": self.throttle,
            "ARM 500 bursts": self.fail_requests,
        }

    async def throttle(self, planned: list[Planned], rng: random.Random) -> bool:
        self.arm.faults.add(path_regex=r"^/subscriptions/", status=429, retry_after=1, times=rng.randint(*BURST))
        return True

    async def fail_requests(self, planned: list[Planned], rng: random.Random) -> bool:
        self.arm.faults.add(path_regex=r"^/subscriptions/", status=500, times=rng.randint(*BURST))
        return True

    async def drop_ssh(self, planned: list[Planned], rng: random.Random) -> bool:
        """Cut the SSH connections into a guest still running."""
        folders = [self.guests.vms.folder(name) for name in self.guests.booted]
        return cut_ssh([running[0] for folder in folders if (running := guest_vms.running(folder)) is not None])

    async def check(self, planned: Planned, folder: Path) -> list[str]:
        status = planned.status
        assert status is not None
        problems = []
        kept = self.arm.resources({"kilnBuildId": status.build_id})
        outputs: set[str] = set()  # the types of the outputs it keeps
        if status.run_state in (RunState.SUCCEEDED, RunState.PARTIALLY_SUCCEEDED):
            log = (await read_log(status.log_uri)).decode(errors="replace")
            if (printed := log.count(planned.token)) != 1:
                problems.append(f"its customization log shows its token {printed} times, not once")
            states = {o.run_output_name: o.provisioning_state for o in status.run_outputs}
            meant = {"managed": "Succeeded", "gallery": "Failed" if planned.kind == "partial" else "Succeeded"}
            if states != meant:
                problems.append(f"its outputs ended {states}, not {meant}")
            outputs = {"Microsoft.Compute/images"}
            if planned.kind != "partial":
                outputs.add("Microsoft.Compute/galleries/images/versions")
            problems += [f"no {kind} of it" for kind in sorted(outputs - {r["type"] for r in kept})]
        for r in kept:
            role = r.get("tags", {}).get("kilnRole")
            if r["type"] not in outputs or role != "output":
                problems.append(f"{r['type']} {r['id']} ({role})")
        problems += self.guests.left_of(status.build_id)
        return problems


@asynccontextmanager
async def environment(client: Client, folder: Path) -> AsyncIterator[AzureSite]:
    """An ARM emulator with what the builds need, real guests for its VMs and an Azurite of its own the soak may
    restart; gallery versions fail to replicate to FAILING_REGION."""
    storage = Storage(await start_azurite(location=folder / "azurite", port=free_port()))
    guests = Guests(folder / "guests", os.urandom(32))
    arm = make_arm(azurite.account_url(azurite.STAGING_ACCOUNT, base=storage.azurite.endpoint), proxy_storage=True)
    arm.start()
    guests.attach(arm)
    try:
        await prepare(arm.base_url)
        arm.faults.slow_replication(
            polls=1, regions=[FAILING_REGION], fail_code="ReplicationFailed",
            fail_message=f"Replication to {FAILING_REGION} failed: storage unavailable.",
        )  # fmt: skip
        yield AzureSite(client, arm, guests, storage, os.urandom(32), folder)
    finally:
        # Both stop guests with asyncio.run: not on this loop.
        await asyncio.to_thread(arm.stop)
        await asyncio.to_thread(guests.close)
        await storage.azurite.stop()
