"""Real local builds for the end-to-end tests, and a look at what each one left on this machine.

``serving`` gives a ``LocalBuilds``: a LocalCloud on the tests' state folder (so the Debian base is cached) and an
Azurite, served by ``worker.run_worker`` on a fresh task queue. Scripts and files
for scriptUri and sourceUri are served from a folder over a loopback HTTP server (or named by file:// URIs).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import os
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob.aio import BlobClient, BlobServiceClient
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError

from activities.clouds.aib.tags import ROLE_LOG, ROLE_OUTPUT, TAG_ROLE
from activities.clouds.base import PermanentError
from activities.clouds.local import LocalCloud, azurite, cgroups
from activities.clouds.local.accounts import KIND_BLOB
from activities.clouds.local.admin import LocalAdmin, read_log
from activities.clouds.local.data_disks import loop_devices
from activities.clouds.local.disks import root_partition
from activities.clouds.local.host import ssh_answers
from activities.clouds.local.qemu import QEMU_KIND
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.staging import LOCAL_SUBSCRIPTION
from activities.clouds.local.storage import LocalStorage
from activities.clouds.local.vm import VM_KIND
from tests.workflows.harness import worker_subprocess
from worker import run_worker
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildStatus, DeadlineRequest
from workflows.plan import build_id_of

SOURCE = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12-gen2", "version": "latest"}
KEPT_ROLES = (ROLE_LOG, ROLE_OUTPUT)


def template(
    customize: list[dict[str, Any]],
    distribute: list[dict[str, Any]] | None = None,
    *,
    source: dict[str, str] | None = None,
    **properties: Any,
) -> dict[str, Any]:
    """A Debian 12 (gen2) template with these customizers, distributed to a VHD unless told otherwise."""
    return {
        "location": "westeurope",
        "properties": {
            "source": source or SOURCE,
            "customize": customize,
            "distribute": distribute or [{"type": "VHD", "runOutputName": "vhd"}],
            **properties,
        },
    }


def shell(name: str, *lines: str) -> dict[str, Any]:
    return {"type": "Shell", "name": name, "inline": list(lines)}


@dataclass
class VmSeen:
    """A VM of a build as it was while the build ran: what must be gone once it has ended."""

    name: str
    address: str
    port: int
    folder: Path
    pid_namespace: int | None = None


@dataclass
class Build:
    handle: WorkflowHandle[Any, Any]
    build_id: str
    vms: dict[str, VmSeen] = field(default_factory=dict)
    watcher: asyncio.Task[None] | None = None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class FileServer:
    """A folder served over HTTP on a loopback port, for scriptUri and sourceUri."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def add(self, name: str, data: bytes) -> tuple[str, str]:
        """Serve ``data`` as ``name``: its URL and its sha256."""
        (self.folder / name).write_bytes(data)
        return self.url(name), hashlib.sha256(data).hexdigest()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class LocalBuilds:
    client: Client
    cloud: LocalCloud
    storage: LocalStorage
    store: ResourceStore
    state: Path
    task_queue: str
    files: FileServer
    builds: list[Build] = field(default_factory=list)
    gallery_records: list[str] = field(default_factory=list)

    async def start(self, template: dict[str, Any], *, prefix: str = "build", task_queue: str | None = None) -> Build:
        """Start a build and watch its VMs while it runs."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        handle = await self.client.start_workflow(
            ImageBuildWorkflow.run, template, id=name, task_queue=task_queue or self.task_queue
        )
        build = Build(handle, build_id_of(name, handle.result_run_id or ""))
        build.watcher = asyncio.create_task(self._watch(build))
        self.builds.append(build)
        return build

    async def finish(self, build: Build) -> BuildStatus:
        """Wait for the build to end, whatever its outcome, and return its final status."""
        with suppress(WorkflowFailureError):
            await build.handle.result()
        if build.watcher is not None:
            build.watcher.cancel()
            with suppress(asyncio.CancelledError):
                await build.watcher
        return await build.handle.query(ImageBuildWorkflow.status)

    async def _watch(self, build: Build) -> None:
        """Note each VM of the build (build VMs and validation VMs), and its PID namespace once it has booted."""
        while True:
            for kind in (VM_KIND, QEMU_KIND):
                for record in await asyncio.to_thread(self.store.list, build_id=build.build_id, kind=kind):
                    name = record.id.rsplit("/", 1)[1]
                    seen = build.vms.setdefault(
                        record.data["folder"],
                        VmSeen(name, record.data["address"], record.data["port"], Path(record.data["folder"])),
                    )
                    if seen.pid_namespace is None and kind == VM_KIND:
                        seen.pid_namespace = self._pid_namespace(name)
            await asyncio.sleep(0.1)

    def _pid_namespace(self, name: str) -> int | None:
        try:
            return os.stat(f"/proc/{self.cloud.vms.leader(name)}/ns/pid").st_ino
        except (PermanentError, FileNotFoundError, ProcessLookupError):
            return None

    async def wait_for_log(self, build: Build, text: str, timeout: float = 120) -> None:
        """Wait until the build's customization.log holds ``text``: the script is running in the guest."""
        async with asyncio.timeout(timeout):
            while True:
                status = await build.handle.query(ImageBuildWorkflow.status)
                if status.log_uri and text in (await read_log(status.log_uri)).decode(errors="replace"):
                    return
                if status.finished:
                    raise AssertionError(f"the build ended ({status.run_state}: {status.message}) before {text!r}")
                await asyncio.sleep(0.2)

    async def abandon_unfinished(self) -> None:
        """After a test that failed half-way: terminate its builds still running and stop their VMs, so that
        nothing of them goes on using this machine."""
        for build in self.builds:
            with suppress(RPCError):
                await build.handle.terminate("the test ended")
            for record in await asyncio.to_thread(self.store.list, build_id=build.build_id):
                name = record.id.rsplit("/", 1)[1]
                if record.kind == VM_KIND:
                    await self.cloud.vms.delete(name)
                elif record.kind == QEMU_KIND:
                    await self.cloud.qemu.delete(name)

    async def make_gallery(self) -> str:
        """A gallery of its own with a Debian 12 gen2 (Hyper-V V2) image definition; the definition's id."""
        gallery = (
            f"/subscriptions/{LOCAL_SUBSCRIPTION}/resourceGroups/kiln-tests/providers/Microsoft.Compute"
            f"/galleries/tests{uuid.uuid4().hex[:8]}"
        )
        definition = f"{gallery}/images/debian12"
        admin = LocalAdmin(self.store)
        self.gallery_records.append((await admin.create_gallery(gallery, location="westeurope")).id)
        record = await admin.create_image_definition(
            definition, hyper_v_generation="V2", publisher="kiln", offer="debian", sku="12-gen2"
        )
        self.gallery_records.append(record.id)
        return definition

    async def set_deadline(self, build: Build, seconds: float) -> None:
        await build.handle.execute_update(ImageBuildWorkflow.set_deadline, DeadlineRequest(seconds=seconds))

    async def log(self, status: BuildStatus, name: str = "customization.log") -> str:
        return (await read_log(status.log_uri.rsplit("/", 1)[0] + f"/{name}")).decode(errors="replace")

    async def leftovers(self, build: Build) -> list[str]:
        """Everything temporary of the build still on this machine (its VMs' processes, mounts, folders, addresses,
        cgroups and loop devices, its captured images) or in its records; empty when it is all gone."""
        left = []
        processes = host_processes()
        mounts = Path("/proc/self/mounts").read_text()
        for vm in build.vms.values():
            # By root, not PID namespace: a namespace's inode number is reused once it is gone.
            left += [
                f"{vm.name}: process {pid} {command!r} inside the VM"
                for pid, root, command in processes
                if root.startswith(f"{vm.folder}/")
            ]
            for pid, _, command in processes:
                if str(vm.folder) in command or f"{vm.address}:" in command:
                    left.append(f"{vm.name}: process {pid} {command!r}")
            left += [f"{vm.name}: mount {line}" for line in mounts.splitlines() if str(vm.folder) in line]
            if vm.folder.exists():
                left.append(f"{vm.name}: its folder {vm.folder}")
            if await ssh_answers(vm.address, vm.port):
                left.append(f"{vm.name}: something still answers on {vm.address}:{vm.port}")
            left += [
                f"{vm.name}: its cgroup {group}" for group in cgroups.cgroup_dirs(vm.name).values() if group.exists()
            ]
        left += [f"process {pid} {command!r}" for pid, _, command in processes if build.build_id in command]
        left += [f"loop device {device} of {file}" for device, file in loop_devices().items() if build.build_id in file]
        captured = self.state / "images" / "captured"
        left += [f"captured image {p}" for p in captured.glob(f"{build.build_id}-*")]
        records = await asyncio.to_thread(self.store.list, build_id=build.build_id)
        left += [
            f"record {r.kind} {r.id} ({r.tags.get(TAG_ROLE)})"
            for r in records
            if r.tags.get(TAG_ROLE) not in KEPT_ROLES
        ]
        recorded = {r.id for r in records}
        blobs = await build_blobs(self.storage.endpoint, build.build_id)
        left += [f"blob {url} (no record of it)" for url in blobs if url not in recorded]
        left += [f"record {r.id} (no blob)" for r in records if r.kind == KIND_BLOB and r.id not in blobs]
        left += [f"container {c}" for c in await build_containers(self.storage.endpoint, build.build_id)]
        return left

    def kept(self, build: Build) -> dict[str, list[str]]:
        """The build's records by role: what it keeps on purpose (logs and outputs)."""
        kept: dict[str, list[str]] = {}
        for record in self.store.list(build_id=build.build_id):
            kept.setdefault(record.tags.get(TAG_ROLE, ""), []).append(record.id)
        return kept


def host_processes() -> list[tuple[int, str, str]]:
    """Every process that runs on the host: pid, root directory and command line. A zombie (killed, not yet reaped
    by whoever inherited it) runs no more and is left out."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
            root = os.readlink(f"/proc/{entry.name}/root")
            command = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append((int(entry.name), root, command))
    return found


def _service(endpoint: str, account: str) -> BlobServiceClient:
    return BlobServiceClient(azurite.account_url(account, base=endpoint), credential=azurite.credential(account))


async def build_blobs(endpoint: str, build_id: str) -> set[str]:
    """The URL of every blob in every local account that the build made (by its kilnbuildid metadata)."""
    found = set()
    for account in azurite.local_accounts():
        async with _service(endpoint, account) as service:
            async for container in service.list_containers():
                with suppress(ResourceNotFoundError):  # another build's staging container, deleted meanwhile
                    async for blob in service.get_container_client(container.name).list_blobs(include=["metadata"]):
                        if (blob.metadata or {}).get("kilnbuildid") == build_id:
                            found.add(service.get_blob_client(container.name, blob.name).url)
    return found


async def build_containers(endpoint: str, build_id: str) -> list[str]:
    """Containers the build made (its staging container)."""
    async with _service(endpoint, azurite.STAGING_ACCOUNT) as service:
        return [
            c.name
            async for c in service.list_containers(include_metadata=True)
            if (c.metadata or {}).get("kilnbuildid") == build_id
        ]


async def region_blobs(endpoint: str, region: str, container: str, prefix: str) -> dict[str, int]:
    """Name and size of the blobs under ``prefix`` in a region's storage account."""
    async with _service(endpoint, azurite.account_for_region(region)) as service:
        client = service.get_container_client(container)
        return {b.name: b.size async for b in client.list_blobs(name_starts_with=prefix)}


async def download_vhd(url: str, path: Path) -> Path:
    """A local sparse copy of a page blob in Azurite: only its written ranges are fetched."""
    account = url.split("/")[3]
    async with BlobClient.from_blob_url(url, credential=azurite.credential(account)) as blob:
        size = (await blob.get_blob_properties()).size
        with path.open("wb") as out:
            out.truncate(size)
            async for page in blob.list_page_ranges():
                data = await (await blob.download_blob(offset=page.start, length=page.end + 1 - page.start)).readall()
                out.seek(page.start)
                out.write(data)
    return path


def debugfs(image: Path, request: str) -> str:
    """Read the image's root filesystem without changing it: debugfs opens it read-only unless given -w, at the
    root partition's offset in the disk."""
    filesystem = f"{image}?offset={root_partition(image).offset}"
    return subprocess.run(["debugfs", "-R", request, filesystem], capture_output=True, text=True, check=True).stdout


@contextmanager
def kiln_home(state: Path) -> Iterator[None]:
    """The local cloud's state folder for this process (its worker secret, its image cache)."""
    before = os.environ.get("KILN_HOME")
    os.environ["KILN_HOME"] = str(state)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KILN_HOME", None)
        else:
            os.environ["KILN_HOME"] = before


@asynccontextmanager
async def worker_process(
    client: Client, state: Path, endpoint: str, task_queue: str, *, boot_check: bool = False, log: Path | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker in a process of its own (``tests.local.local_worker``), stopped at the end unless it is gone; its
    output goes to ``log`` when given."""
    env = {
        **os.environ,
        "KILN_TEST_BOOT_CHECK": "1" if boot_check else "0",
        "KILN_HOME": str(state),
        "KILN_AZURITE_ENDPOINT": endpoint,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "KILN_TEST_TASK_QUEUE": task_queue,
    }
    async with worker_subprocess(client, task_queue, "tests.local.local_worker", env=env, log=log) as process:
        yield process


@asynccontextmanager
async def serving(
    client: Client, endpoint: str, state: Path, store: ResourceStore, files: Path, *, boot_check: bool = False
) -> AsyncIterator[LocalBuilds]:
    """Real local builds on the base cached in ``state``, served on a task queue of their own; ``files`` is served
    for scriptUri and sourceUri. Images are booted only to run validators, unless ``boot_check`` (a boot is about
    a minute under TCG). The builds' records (logs and outputs included) go afterwards, as the Azurite that held
    their blobs does."""
    with kiln_home(state):
        storage = LocalStorage(store=store, endpoint=endpoint)
        builds = LocalBuilds(
            client=client,
            cloud=LocalCloud(storage=storage, store=store, state=state, boot_check=boot_check),
            storage=storage,
            store=store,
            state=state,
            task_queue=f"kiln-local-test-{uuid.uuid4()}",
            files=FileServer(files),
        )
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(client, builds.cloud, task_queue=builds.task_queue, stop=stop))
        try:
            yield builds
        finally:
            stop.set()
            await worker
            await builds.abandon_unfinished()
            await builds.cloud.close()
            builds.files.close()
            for build in builds.builds:
                for record in store.list(build_id=build.build_id):
                    store.forget(record.id)
            for record_id in builds.gallery_records:
                store.forget(record_id)
