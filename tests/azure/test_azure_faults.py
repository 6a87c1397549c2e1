"""The build's fault matrix on the Azure cloud: every step failing every way, through the real Azure SDK clients,
the ARM emulator (blob traffic passes through it to Azurite, so storage can fail too) and real SSH guests.

Each scenario has its own emulator, task queue and worker, and the scenarios of one kind run at once. After every
one, the subscription holds nothing tagged with the build's id but what a successful build makes on purpose: its
ManagedImage and its gallery image version (tagged ``kilnRole: output``). The logs and the VHD output are blobs in
the log account (``KILN_LOG_ACCOUNT``), which outlives builds by design and is no resource of theirs. A staging
group the template names outlives the build, empty of kiln's resources.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from azure.core.exceptions import ResourceNotFoundError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from activities.clouds.azure.clients import BlobClients
from activities.clouds.local import azurite as local_azurite
from tests.arm_emulator import ArmEmulator
from tests.arm_emulator.faults import RequestFault
from tests.azure.environment import (
    GALLERY,
    LOCATION,
    REGION2,
    RG,
    SCRIPT,
    SUB,
    UBUNTU,
    AzureHarness,
    Guests,
    azure_worker,
    make_arm,
    owner_clients,
    prepare,
)
from tests.workflows.harness import check_all, retried_activities
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildStatus, DeadlineRequest, RunState

USER_GROUP = "userStaging"
USER_GROUP_ID = f"/subscriptions/{SUB}/resourceGroups/{USER_GROUP}"
# A guest script shows it is running by this line of output (its source says $((6*7)), so only output matches).
RUNNING = "step running: 42"
SAY_RUNNING = 'echo "step running: $((6*7))"'
# AIB's deprovision, as a deprovisioning script written by a customizer ends with it.
AIB_DEPROVISION_COMMAND = "/usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync"
# How long a held ARM or blob request waits before it is answered: longer than a scenario needs to act on it.
HOLD = 30.0
VERSIONS = r"/skus/18\.04-LTS/versions"
STAGED_BLOBS = r"^/kilnstaging/staging/.+"


@dataclass
class Hang:
    """A step held in the middle: ``entered`` once the step is inside it, ``release`` lets it go on."""

    entered: Callable[[], bool]
    release: Callable[[], None] = field(default=lambda: None)


def held(arm: ArmEmulator, method: str, path_regex: str) -> Hang:
    """The first matching request is answered only after HOLD seconds."""
    fault = arm.faults.add(method=method, path_regex=path_regex, status=None, delay=HOLD)
    return Hang(lambda: fault.hits > 0)


def hung(arm: ArmEmulator, method: str, path_regex: str) -> Hang:
    """The first matching long-running operation stays InProgress until released."""
    fault = arm.faults.slow_operation(method=method, path_regex=path_regex, polls=None)

    def release() -> None:
        fault.polls = 0

    return Hang(lambda: fault.hits > 0, release)


def denied(arm: ArmEmulator, method: str, path_regex: str, action: str, code: str = "AuthorizationFailed") -> None:
    arm.faults.add(
        method=method,
        path_regex=path_regex,
        status=403,
        code=code,
        message=f"The client 'kiln' does not have authorization to perform action '{action}' over the scope.",
        times=None,
    )


def throttled(arm: ArmEmulator, method: str, path_regex: str, times: int = 2) -> Any:
    return arm.faults.add(method=method, path_regex=path_regex, status=429, retry_after=1, times=times)


def server_error(arm: ArmEmulator, method: str, path_regex: str, times: int = 2) -> Any:
    return arm.faults.add(method=method, path_regex=path_regex, status=500, times=times)


def vm_faults(suffix: str) -> dict[str, Callable[[ArmEmulator], Any]]:
    vm = rf"/virtualMachines/[^/]*-{suffix}$"
    return {
        "transient": lambda arm: [throttled(arm, "PUT", vm)],
        "fatal": lambda arm: arm.faults.fail_operation(
            method="PUT",
            path_regex=vm,
            code="QuotaExceeded",
            message="Operation could not be completed as it results in exceeding approved standardDSv2Family Cores "
            "quota. Location: eastus, Current Limit: 0, Current Usage: 0, Additional Required: 1.",
            times=None,
        ),
        "hang": lambda arm: hung(arm, "PUT", vm),
    }


def replication_hang(arm: ArmEmulator) -> Hang:
    fault = arm.faults.slow_replication(polls=None, regions=[REGION2])

    def release() -> None:
        fault.polls = 0

    return Hang(lambda: any(c.method == "PUT" and "/images/ubuntu/versions/" in c.path for c in arm.calls), release)


def distribute_denied(arm: ArmEmulator) -> None:
    denied(arm, "PUT", r"/images/golden$", "Microsoft.Compute/images/write")
    denied(arm, "PUT", r"/images/ubuntu/versions/", "Microsoft.Compute/galleries/images/versions/write")
    denied(arm, "POST", r"/snapshots/[^/]+/beginGetAccess$", "Microsoft.Compute/snapshots/beginGetAccess/action")


@dataclass(frozen=True)
class Step:
    """One step of an Azure build and how each kind of fault reaches it: through the emulator (``faults``), or,
    for a step that runs a script in the guest (``guest``), through that script."""

    slug: str
    name: str  # the start of the step's name in the build's status
    activity: str
    faults: dict[str, Callable[[ArmEmulator], Any]] = field(default_factory=dict)
    guest: str = ""  # which of the template's scripts the step runs: customize, deprovision or validate
    vm: str = "build"
    fails_as: str = ""  # what a Failed build's message says, when it is not the step's name


STEPS = [
    Step(
        "resolve-source",
        "resolve source",
        "resolve_source",
        {
            "transient": lambda arm: [throttled(arm, "GET", VERSIONS, times=3)],
            "fatal": lambda arm: denied(
                arm, "GET", VERSIONS, "Microsoft.Compute/locations/publishers/artifacttypes/offers/skus/versions/read"
            ),
            "hang": lambda arm: held(arm, "GET", VERSIONS),
        },
    ),
    Step(
        "create-staging",
        "create staging",
        "create_staging",
        {
            "transient": lambda arm: [
                server_error(arm, "PUT", r"/resourcegroups/IT_[^/]+$"),
                throttled(arm, "PUT", r"/storageAccounts/kiln", times=1),
            ],
            "fatal": lambda arm: denied(
                arm,
                "PUT",
                r"/storageAccounts/kiln",
                "Microsoft.Storage/storageAccounts/write",
                "RequestDisallowedByPolicy",
            ),
            "hang": lambda arm: hung(arm, "PUT", r"/storageAccounts/kiln"),
        },
    ),
    Step(
        "stage-artifacts",
        "stage artifacts",
        "stage_artifacts",
        {
            # Blob storage is busy once; the storage SDK waits and tries again.
            "transient": lambda arm: [
                arm.faults.add(method="PUT", path_regex=STAGED_BLOBS, status=503, code="ServerBusy", times=1)
            ],
            # The identity lacks a data role on the staging account (shared keys are off there).
            "fatal": lambda arm: arm.faults.add(
                method="PUT",
                path_regex=STAGED_BLOBS,
                status=403,
                code="AuthorizationPermissionMismatch",
                message="This request is not authorized to perform this operation using this permission.",
                times=None,
            ),
            "hang": lambda arm: held(arm, "PUT", STAGED_BLOBS),
        },
    ),
    Step("create-build-vm", "create build VM", "create_vm", vm_faults("build")),
    Step("customize", "customize 2/", "run_customizer", guest="customize"),
    Step("deprovision", "deprovision", "generalize", guest="deprovision"),
    Step(
        "capture",
        "capture image",
        "capture_image",
        {
            "transient": lambda arm: [
                server_error(arm, "PUT", r"/snapshots/[^/]+$"),
                throttled(arm, "PUT", r"/images/[^/]+-image$", times=1),
            ],
            "fatal": lambda arm: denied(
                arm, "POST", r"/deallocate$", "Microsoft.Compute/virtualMachines/deallocate/action"
            ),
            "hang": lambda arm: hung(arm, "PUT", r"/snapshots/[^/]+$"),
        },
    ),
    Step("create-validation-vm", "create validation VM", "create_vm", vm_faults("validation"), vm="validation"),
    Step("validate", "validate 1/1: check", "run_customizer", guest="validate", vm="validation"),
    Step(
        "distribute",
        "distribute",
        "distribute",
        {
            "transient": lambda arm: [
                server_error(arm, "PUT", r"/images/golden$"),
                throttled(arm, "PUT", r"/images/ubuntu/versions/"),
                server_error(arm, "POST", r"/snapshots/[^/]+/beginGetAccess$", times=1),
            ],
            "fatal": distribute_denied,
            "hang": replication_hang,
        },
        fails_as="Failed in distributing 3 images out of total 3",
    ),
]


def template(h: AzureHarness, *, step: Step | None = None, script: str = "", staging_group: str = "") -> dict[str, Any]:
    """A template using every Linux step and all three targets; ``script`` is what the guest ``step`` runs."""
    guest = step.guest if step is not None else ""
    configure = h.artifacts / "configure.sh"
    configure.write_bytes(SCRIPT)
    customize: list[dict[str, Any]] = [
        {
            "type": "Shell",
            "name": "configure",
            "scriptUri": configure.as_uri(),
            "sha256Checksum": hashlib.sha256(SCRIPT).hexdigest(),
        },
        {"type": "Shell", "name": "work", "inline": [script if guest == "customize" else "echo working"]},
    ]
    if guest == "deprovision":
        # AIB runs this file instead of its own deprovision command; it ends with that command, which deletes the
        # admin user, so a worker that takes the step over cannot log in again.
        write = f"printf '%s\\n' {shlex.quote(script)} {shlex.quote(AIB_DEPROVISION_COMMAND)} > /tmp/DeprovisioningScript.sh"
        customize.append({"type": "Shell", "name": "deprovisioning script", "inline": [write]})
    compute = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute"
    properties: dict[str, Any] = {
        "source": dict(UBUNTU),
        "customize": customize,
        "validate": {
            "inVMValidations": [
                {"type": "Shell", "name": "check", "inline": [script if guest == "validate" else "echo validated"]}
            ]
        },
        "distribute": [
            {
                "type": "ManagedImage",
                "runOutputName": "managed",
                "imageId": f"{compute}/images/golden",
                # Another region than the build's: the image is made from a copy of the snapshot, which the
                # cleanup after any fault must remove too.
                "location": REGION2,
            },
            {
                "type": "SharedImage",
                "runOutputName": "gallery",
                "galleryImageId": f"{compute}/galleries/{GALLERY}/images/ubuntu",
                "targetRegions": [{"name": LOCATION}, {"name": REGION2}],
            },
            {"type": "VHD", "runOutputName": "vhd"},
        ],
    }
    if staging_group:
        properties["stagingResourceGroup"] = staging_group
    return {"location": LOCATION, "properties": properties}


@dataclass
class Scenario:
    """One build against an emulator of its own, with a worker on a task queue of its own."""

    h: AzureHarness
    step: Step
    blobs: BlobClients
    user_group: bool

    @property
    def arm(self) -> ArmEmulator:
        return self.h.arm

    def template(self, script: str = "") -> dict[str, Any]:
        return template(self.h, step=self.step, script=script, staging_group=USER_GROUP_ID if self.user_group else "")

    async def start(self, template: dict[str, Any], kind: str) -> WorkflowHandle[Any, Any]:
        return await self.h.start(template, f"{kind}-{self.step.slug}")

    async def log(self, status: BuildStatus) -> bytes:
        """The log the step writes to: validation.log for a validator, else customization.log."""
        uri = status.log_uri
        if self.step.guest == "validate":
            uri = uri.replace("customization.log", "validation.log")
        try:
            return await (await self.blobs.blob(uri).download_blob()).readall()
        except ResourceNotFoundError:
            return b""

    async def wait_inside(self, handle: WorkflowHandle[Any, Any], hang: Hang | None) -> BuildStatus:
        """Wait until the step runs and is inside its fault: the ARM or blob call held, or the guest script
        running (its first line of output is in the log)."""
        async with asyncio.timeout(180):
            while True:
                status = await self.h.wait_for_step(handle, self.step.name, timeout=180)
                if hang.entered() if hang is not None else RUNNING.encode() in await self.log(status):
                    return status
                await asyncio.sleep(0.2)

    def assert_clean(self, status: BuildStatus) -> None:
        """Nothing tagged with the build's id is left but a successful build's outputs, and a user's staging group
        is still there, holding nothing."""
        kept = self.arm.resources({"kilnBuildId": status.build_id})
        if status.run_state == RunState.SUCCEEDED:
            assert sorted(r["type"] for r in kept) == [
                "Microsoft.Compute/galleries/images/versions",
                "Microsoft.Compute/images",
            ], kept
            assert {r["tags"]["kilnRole"] for r in kept} == {"output"}
        else:
            assert kept == [], [r["id"] for r in kept]
        assert status.resources == []
        if self.user_group:
            ids = [r["id"].lower() for r in self.arm.resources()]
            assert USER_GROUP_ID.lower() in ids, "the user's staging group was deleted"
            assert [i for i in ids if i.startswith(USER_GROUP_ID.lower() + "/")] == []


@asynccontextmanager
async def scenario(
    client: Client, blob_account: str, directory: Path, step: Step, *, user_group: bool = False, worker: bool = True
) -> AsyncIterator[Scenario]:
    """An emulator with what the template needs (and, with ``user_group``, an empty staging group of the user's),
    real guests for its VMs, and (with ``worker``) an in-process worker."""
    directory.mkdir(parents=True)
    artifacts = directory / "artifacts"
    artifacts.mkdir()
    guests = Guests(directory / "guests", os.urandom(32))
    blobs = BlobClients(local_azurite.credential(local_azurite.STAGING_ACCOUNT))
    arm = make_arm(blob_account, proxy_storage=True)
    arm.start()
    guests.attach(arm)
    h = AzureHarness(client, arm, blob_account, os.urandom(32), f"kiln-azure-{uuid.uuid4()}", artifacts, [])
    try:
        await prepare(arm.base_url)
        if user_group:
            owner = owner_clients(arm.base_url)
            try:
                await owner.resource.resource_groups.create_or_update(USER_GROUP, {"location": LOCATION})
            finally:
                await owner.close()
        if worker:
            h.start_worker()
        yield Scenario(h, step, blobs, user_group)
    finally:
        await h.stop_workers()
        await blobs.close()
        # Both stop guests with asyncio.run: not on this loop.
        await asyncio.to_thread(arm.stop)
        await asyncio.to_thread(guests.close)


def drop_ssh(host: str) -> None:
    """Cut every SSH connection into the guest at ``host``: its sshd's session processes die, scripts run on."""
    listing = subprocess.run(
        ["ss", "-Htnp", "state", "established", "( sport = :22 )"], capture_output=True, text=True, check=True
    ).stdout
    pids = {
        int(part.split("=", 1)[1])
        for line in listing.splitlines()
        if line.split()[2] == f"{host}:22"
        for part in line.replace(",", " ").split()
        if part.startswith("pid=")
    }
    assert pids, f"no SSH connection into {host}"
    for pid in pids - {os.getpid()}:
        os.kill(pid, signal.SIGKILL)


async def test_a_transient_fault_at_any_step_costs_retries_not_the_build(
    client: Client, blob_account: str, directory: Path
) -> None:
    """Throttling (429 with Retry-After), ARM server errors, a busy blob service, or the SSH connection into the
    guest dropping mid-script: the build succeeds, a dropped script is read on rather than run again, and nothing
    but the outputs is left."""

    async def run(step: Step) -> None:
        async with scenario(client, blob_account, directory / step.slug, step) as s:
            if step.guest:
                handle = await s.start(s.template(f"{SAY_RUNNING}; sleep 12"), "transient")
                status = await s.wait_inside(handle, None)
                drop_ssh(s.arm.guest(f"{status.build_id}-{step.vm}").host)
            else:
                faults = step.faults["transient"](s.arm)
                handle = await s.start(s.template(), "transient")
            status = await s.h.finish(handle)
            assert status.run_state == RunState.SUCCEEDED, status.message
            if step.guest:
                assert step.activity in await retried_activities(handle), "the dropped connection went unnoticed"
                assert (await s.log(status)).count(RUNNING.encode()) == 1
            else:
                assert all(f.hits for f in faults), "a fault never fired"
            s.assert_clean(status)

    await check_all({step.slug: run(step) for step in STEPS})


async def test_a_permanent_fault_at_any_step_fails_the_build_naming_it_and_leaves_nothing(
    client: Client, blob_account: str, directory: Path
) -> None:
    """A missing quota, role or policy exemption, or a script exiting non-zero, fails the build at once; its
    message names the step; nothing is left, and the user's staging group is kept, empty."""

    async def run(step: Step) -> None:
        async with scenario(client, blob_account, directory / step.slug, step, user_group=True) as s:
            if step.guest:
                template = s.template(f"{SAY_RUNNING}; exit 3")
            else:
                step.faults["fatal"](s.arm)
                template = s.template()
            status = await s.h.finish(await s.start(template, "fatal"))
            assert status.run_state == RunState.FAILED
            assert (step.fails_as or step.name) in status.message, status.message
            assert any(why in status.message for why in ("permission denied", "quota", "exit code 3")), status.message
            s.assert_clean(status)

    await check_all({step.slug: run(step) for step in STEPS})


# How a stopped build ends: its Temporal status, its runState, and how its message names the step.
STOPPED = {
    "cancel": (WorkflowExecutionStatus.CANCELED, RunState.CANCELED, "Canceled during"),
    "deadline": (WorkflowExecutionStatus.FAILED, RunState.FAILED, "The build timed out during"),
}


@pytest.mark.parametrize("how", STOPPED)
async def test_a_cancel_or_the_deadline_while_any_step_hangs_stops_the_build_and_leaves_nothing(
    client: Client, blob_account: str, directory: Path, how: str
) -> None:
    """A cancel, or the deadline moved to now, while a step hangs (an operation that never ends, a held request,
    a script that sleeps) stops the build saying during which step, and deletes everything it made. Cancelled
    builds use the user's staging group, which is kept."""

    async def run(step: Step) -> None:
        async with scenario(client, blob_account, directory / step.slug, step, user_group=how == "cancel") as s:
            hang = None if step.guest else step.faults["hang"](s.arm)
            handle = await s.start(s.template(f"{SAY_RUNNING}; sleep 600"), how)
            await s.wait_inside(handle, hang)
            if how == "cancel":
                await handle.cancel()
            else:
                await handle.execute_update(ImageBuildWorkflow.set_deadline, DeadlineRequest(seconds=0))
            status = await s.h.finish(handle)
            assert (await handle.describe()).status == STOPPED[how][0]
            assert status.run_state == STOPPED[how][1]
            assert f"{STOPPED[how][2]} {step.name}" in status.message, status.message
            s.assert_clean(status)

    await check_all({step.slug: run(step) for step in STEPS})


def worker_process(s: Scenario) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """A worker in a process of its own, on the scenario's emulator, queue and secret; stopped on the way out."""
    log = s.h.artifacts.parent / "worker.log"
    return azure_worker(s.h.client, s.arm.base_url, s.h.blob_account, s.h.secret, s.h.task_queue, log)


async def resume_points_recorded(handle: WorkflowHandle[Any, Any], key: bytes, count: int = 1) -> None:
    """``count`` of the build's running activities have sent Temporal heartbeat details holding ``key``."""
    async with asyncio.timeout(60):
        while True:
            pending = (await handle.describe()).raw_description.pending_activities
            details = [b"".join(p.data for p in a.heartbeat_details.payloads) for a in pending]
            if sum(key in d for d in details) >= count:
                return
            await asyncio.sleep(0.2)


async def test_a_build_resumes_on_a_new_worker_when_its_worker_is_killed_at_any_step(
    client: Client, blob_account: str, directory: Path
) -> None:
    """A worker SIGKILLed mid-step (mid-replication too) loses nothing: another worker retries that step alone,
    re-attaches to a script already running in the guest, picks a hung operation up where it is, and the build
    succeeds with nothing left but its outputs."""

    async def run(step: Step) -> None:
        async with scenario(client, blob_account, directory / step.slug, step, worker=False) as s:
            hang = None if step.guest else step.faults["hang"](s.arm)
            template = s.template(f"{SAY_RUNNING}; sleep 12")
            async with worker_process(s) as first:
                handle = await s.start(template, "kill")
                await s.wait_inside(handle, hang)
                if step.slug == "distribute":  # the replication's poller token has reached Temporal
                    await resume_points_recorded(handle, b'"token"')
                first.kill()
                await first.wait()
            if hang is not None:
                hang.release()
            async with worker_process(s):
                status = await s.h.finish(handle)
            assert status.run_state == RunState.SUCCEEDED, status.message
            assert await retried_activities(handle) == {step.activity}, "the kill did not land in the step"
            if step.guest:
                assert (await s.log(status)).count(RUNNING.encode()) == 1, "the script ran twice"
            if step.slug == "distribute":
                puts = [c for c in s.arm.calls if c.method == "PUT" and "/images/ubuntu/versions/" in c.path]
                assert len(puts) == 1, "replication was started over, not picked up"
            s.assert_clean(status)

    await check_all({step.slug: run(step) for step in STEPS})


async def test_a_worker_killed_mid_copy_leaves_the_copies_to_the_next_one(
    client: Client, blob_account: str, directory: Path
) -> None:
    """A worker SIGKILLed while the snapshot's copy into the managed image's region and the VHD's server-side
    blob copy are both still running: the next worker waits for those same copies instead of starting new ones."""
    step = next(s for s in STEPS if s.slug == "distribute")
    async with scenario(client, blob_account, directory / "copies", step, worker=False) as s:
        vhd = f"{s.arm.base_url}{urlsplit(blob_account).path}/vhds/{uuid.uuid4().hex}.vhd"
        built = s.template()
        built["properties"]["distribute"][2]["uri"] = vhd
        vhd_path = urlsplit(vhd).path
        s.arm.snapshot_copy_polls = None
        s.arm.blob_copy_polls = None

        def polls() -> tuple[int, int]:
            """GETs of the snapshot copy and reads of the VHD blob so far."""
            calls = list(s.arm.calls)
            return (
                sum(c.method == "GET" and c.path.endswith("-out0-osdisk") for c in calls),
                sum(c.method == "HEAD" and c.path == vhd_path for c in calls),
            )

        async def until_polled_past(before: tuple[int, int]) -> None:
            async with asyncio.timeout(180):
                while not all(now > then for now, then in zip(polls(), before, strict=True)):
                    await asyncio.sleep(0.2)

        async with worker_process(s) as first:
            handle = await s.start(built, "kill-copies")
            await until_polled_past((0, 0))
            await resume_points_recorded(handle, b'"copy"', 2)  # the snapshot's and the blob's
            first.kill()
            await first.wait()
        async with worker_process(s):
            await until_polled_past(polls())  # the new worker is waiting on the copies
            s.arm.snapshot_copy_polls = 0
            s.arm.blob_copy_polls = 0
            status = await s.h.finish(handle)
        assert status.run_state == RunState.SUCCEEDED, status.message
        assert await retried_activities(handle) == {"distribute"}
        copy_puts = [c for c in s.arm.calls if c.method == "PUT" and c.path.endswith("-out0-osdisk")]
        assert len(copy_puts) == 1, "the snapshot copy was started over, not picked up"
        blob_puts = [c for c in s.arm.calls if c.method == "PUT" and c.path == vhd_path]
        assert len(blob_puts) == 1, "the blob copy was started over, not picked up"
        image = next(r for r in s.arm.resources() if r["id"].endswith("/images/golden"))
        assert image["location"] == REGION2
        s.assert_clean(status)


async def killed_while_its_answer_is_held(s: Scenario, template: dict[str, Any], held: RequestFault) -> BuildStatus:
    """Build ``template`` on a worker SIGKILLed once the request ``held`` has been served but not yet answered, and
    finish it on a second worker."""
    async with worker_process(s) as first:
        handle = await s.start(template, "unanswered")
        async with asyncio.timeout(180):
            while held.hits == 0:
                await asyncio.sleep(0.1)
        first.kill()
        await first.wait()
    async with worker_process(s):
        return await s.h.finish(handle)


async def test_a_worker_killed_before_it_learns_its_vhd_copy_started_leaves_that_copy_to_the_next_one(
    client: Client, blob_account: str, directory: Path
) -> None:
    """The blob service started the VHD's copy, but the worker was SIGKILLed before the answer reached it, so no
    copy id was ever recorded: the next worker finds the copy by the build id on its blob and waits for it."""
    step = next(s for s in STEPS if s.slug == "distribute")
    async with scenario(client, blob_account, directory / "unanswered", step, worker=False) as s:
        vhd = f"{s.arm.base_url}{urlsplit(blob_account).path}/vhds/{uuid.uuid4().hex}.vhd"
        built = s.template()
        built["properties"]["distribute"][2]["uri"] = vhd
        s.arm.blob_copy_polls = 3  # still pending when the next worker looks
        copy_start = s.arm.faults.add(
            method="PUT", path_regex=f"^{urlsplit(vhd).path}$", status=None, answer_delay=HOLD, times=1
        )
        status = await killed_while_its_answer_is_held(s, built, copy_start)
        assert status.run_state == RunState.SUCCEEDED, status.message
        assert copy_start.match.seen == 1, "the VHD copy was started again"
        [output] = [o for o in status.run_outputs if o.type == "VHD"]
        assert output.artifact_uri == vhd
        s.assert_clean(status)


async def test_a_worker_killed_before_it_learns_its_gallery_version_was_accepted_leaves_it_to_the_next_one(
    client: Client, blob_account: str, directory: Path
) -> None:
    """ARM accepted the gallery image version (replication under way), but the worker was SIGKILLed before the
    answer reached it, so no poller was recorded: the next worker finds the version by its tags and waits for it
    instead of sending the PUT, and the replication, again."""
    step = next(s for s in STEPS if s.slug == "distribute")
    async with scenario(client, blob_account, directory / "unanswered", step, worker=False) as s:
        s.arm.faults.slow_replication(polls=5, regions=[REGION2])  # still replicating when the next worker looks
        version_put = s.arm.faults.add(
            method="PUT", path_regex=r"/images/ubuntu/versions/[^/]+$", status=None, answer_delay=HOLD, times=1
        )
        status = await killed_while_its_answer_is_held(s, s.template(), version_put)
        assert status.run_state == RunState.SUCCEEDED, status.message
        assert version_put.match.seen == 1, "the gallery image version was sent again"
        [output] = [o for o in status.run_outputs if o.type == "SharedImage"]
        assert output.replication == {LOCATION: "Completed", REGION2: "Completed"}
        s.assert_clean(status)


async def test_vhd_targets_sharing_the_snapshots_export_do_not_break_each_others_copies(
    client: Client, blob_account: str, directory: Path
) -> None:
    """One endGetAccess revokes every SAS of a snapshot and fails the copies still reading from it. Two VHD targets
    copy from the same export; the one that finishes first leaves the SAS to the other, whose copy goes on."""
    step = next(s for s in STEPS if s.slug == "distribute")
    async with scenario(client, blob_account, directory / "shared-export", step) as s:
        vhds = [f"{s.arm.base_url}{urlsplit(blob_account).path}/vhds/{uuid.uuid4().hex}.vhd" for _ in range(2)]
        paths = [urlsplit(vhd).path for vhd in vhds]
        built = s.template()
        built["properties"]["distribute"] = [
            {"type": "VHD", "runOutputName": name, "uri": vhd}
            for name, vhd in zip(("first", "second"), vhds, strict=True)
        ]
        assert s.arm.blob_proxy is not None
        release_first, release_second = (s.arm.blob_proxy.hold_copies(f"^{path}$") for path in paths)
        handle = await s.start(built, "shared-export")

        def copies_started() -> list[int]:
            return [sum(c.method == "PUT" and c.path == path for c in s.arm.calls) for path in paths]

        async with asyncio.timeout(180):
            while 0 in copies_started():
                await asyncio.sleep(0.1)
            release_first()
            while not any(
                step.name == "distribute VHD first" and step.outcome == "succeeded"
                for step in (await handle.query(ImageBuildWorkflow.status)).steps
            ):
                await asyncio.sleep(0.1)
        release_second()
        status = await s.h.finish(handle)
        assert status.run_state == RunState.SUCCEEDED, status.message
        assert await retried_activities(handle) == set(), "a copy was broken and started over"
        assert copies_started() == [1, 1]
        assert s.arm.resources({"kilnBuildId": status.build_id}) == []
