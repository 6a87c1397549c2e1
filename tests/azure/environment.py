"""The Azure cloud's test environment: the ARM emulator, Azurite, guests for its VMs and corpus builds on a worker.

Shared by the fixtures in ``conftest.py``, the build tests and ``bench/bench_azure.py``, so a benchmark measures
exactly what the tests exercise. The real Azure SDK clients (``.aio``) talk to the emulator over HTTP; only the
token is fake. Blob data goes to Azurite with its account key (Azurite takes no Entra tokens, hence
``AzureCloud``'s ``blob_credential``). kiln's clients hold the role ``deploy/azure-role.json`` ships and nothing more
(the emulator enforces it, see ``tests/arm_emulator/rbac.py``); what a test sets up beforehand, as the user would,
it does as an Owner (``owner_clients``). A VM the emulator creates gets a real guest: a local VM (``LocalVms``) whose
root is an overlay on this machine's own root, provisioned as Azure's agent would from the VM's osProfile (admin
user, SSH key), with a ``waagent`` that deprovisions the admin user, and reachable on its own loopback address at
port 22. A Windows VM gets a scripted Windows machine (``tests.wsman``) with the admin
account of its osProfile, on its own loopback address, whose WinRM HTTPS listener kiln's run command turns on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle

from activities.clouds.azure import AzureCloud
from activities.clouds.azure.clients import ArmClients
from activities.clouds.azure.waits import Backoff
from activities.clouds.local import azurite as local_azurite
from activities.clouds.local.overlays import overlay_works
from activities.clouds.local.records import ResourceStore
from activities.guest import Guests as OsProfiles
from activities.guest.linux import LinuxProfile
from activities.guest.windows import WindowsProfile, WinRmTransport
from activities.guest.windows_restart import RestartTiming
from activities.guest.winrm import WinRmSettings
from tests.arm_emulator import (
    ArmEmulator,
    Azurite,
    FakeAsyncCredential,
    GuestEndpoint,
    GuestSpec,
    PlatformImage,
    Role,
    client_kwargs,
)
from tests.azure import guest_vms
from tests.azure.guest_vms import GuestVms, _Layer
from tests.fixtures import CORPUS
from tests.services import free_loopback_address
from tests.workflows.harness import finish, wait_for_step, worker_subprocess
from tests.wsman import MachineSettings, WindowsMachine
from tests.wsman.machine import WINRM_HTTPS_PORT
from worker import run_worker
from workflows.build import ImageBuildWorkflow
from workflows.models import BuildContext, BuildStatus, ResolvedSource, VmSpec
from workflows.template import VmProfile
from workflows.template.arm import is_arm_wrapper, resolve_arm_wrapper

PROJECT = Path(__file__).parents[2]
SUB = "6f1c2a9e-5b0d-4c47-9d43-0b6a3c2e7f10"
# The bearer token kiln's clients send: the principal the shipped role is assigned to.
KILN_PRINCIPAL = "kiln-worker"
SHIPPED_ROLE = PROJECT / "deploy" / "azure-role.json"
# Azure's NIC reservation (180 s) and kiln's wait for it (in_use_wait), scaled down alike for the tests.
NIC_RESERVATION = 1.0
IN_USE_WAIT = 5.0
LOCATION = "eastus"
REGION2 = "westus2"
RG = "aibImageRG"
GALLERY = "kilnGallery"
SCRIPT = b"#!/bin/sh\necho customized by $(id -un) > /tmp/customized\n"
# Gen2 marketplace images say they can run as Trusted Launch VMs.
TRUSTED_LAUNCH_SUPPORTED = {"SecurityType": "TrustedLaunchSupported"}
# The corpus's Windows scriptUri stands for danielsollondon's testPsScript.ps1, which makes the folder the
# template's File customizer writes into.
WINDOWS_SCRIPT = (
    b"mkdir c:\\buildArtifacts\r\necho Azure-Image-Builder-Was-Here  > c:\\buildArtifacts\\azureImageBuilder.txt\r\n"
)
# The marketplace as far as the corpus templates use it.
PLATFORM_IMAGES = {
    ("Canonical", "UbuntuServer", "18.04-LTS"): PlatformImage(versions=["18.04.202401010", "18.04.202312120"]),
    ("Canonical", "UbuntuServer", "16.04-LTS"): PlatformImage(versions=["16.04.202109280"]),
    ("Canonical", "0001-com-ubuntu-server-focal", "20_04-lts-gen2"): PlatformImage(
        versions=["20.04.202402010", "20.04.202310250"], hyper_v_generation="V2", features=TRUSTED_LAUNCH_SUPPORTED
    ),
    # The live suite's source (tests/azure_live).
    ("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2"): PlatformImage(
        versions=["22.04.202404090"], hyper_v_generation="V2", features=TRUSTED_LAUNCH_SUPPORTED
    ),
    ("MicrosoftWindowsServer", "WindowsServer", "2022-datacenter-azure-edition"): PlatformImage(
        versions=["20348.2227.240104"], os_type="Windows", hyper_v_generation="V2"
    ),
    ("MicrosoftWindowsServer", "WindowsServer", "2019-Datacenter"): PlatformImage(
        versions=["17763.5329.240105", "17763.5206.231202"], os_type="Windows"
    ),
    ("MicrosoftWindowsDesktop", "Windows-10", "20h2-pro"): PlatformImage(
        versions=["19042.2965.230505"], os_type="Windows"
    ),
    ("MicrosoftWindowsDesktop", "windows-10", "20h1-ent"): PlatformImage(
        versions=["19041.1415.220106"], os_type="Windows"
    ),
}

# The platform image of the Azure tests' own templates.
UBUNTU = {
    "type": "PlatformImage",
    "publisher": "Canonical",
    "offer": "UbuntuServer",
    "sku": "18.04-LTS",
    "version": "latest",
}

# The guest's agent and tools, as far as the corpus templates use them.
WAAGENT = """#!/bin/sh
if [ "$1" = "-version" ]; then echo "WALinuxAgent-2.9.1.1 running on kiln-test-guest"; exit 0; fi
user=$(cat /var/lib/kiln-test-guest/admin-user)
echo "WARNING! The waagent service will be stopped."
echo "WARNING! $user account and entire home directory will be deleted."
userdel -f "$user" 2>/dev/null || true
rm -rf "/home/$user"
touch /var/lib/kiln-test-guest/deprovisioned
"""
# The admin user is uid 0 in the test guest, so sudo needs no privilege of its own.
SUDO = """#!/bin/sh
[ "$1" = "-n" ] && shift
exec "$@"
"""
APT = """#!/bin/sh
echo "Reading package lists... Done"
echo "$* : already the newest version (test guest)."
"""


def make_arm(blob_account: str, **settings: Any) -> ArmEmulator:
    """An emulator (not started) with the corpus's platform images, exporting disks to Azurite's staging account,
    where kiln's principal holds the shipped role and a NIC is reserved for a VM that is gone for NIC_RESERVATION
    seconds rather than Azure's 180."""
    settings.setdefault("roles", {KILN_PRINCIPAL: Role.from_file(SHIPPED_ROLE)})
    arm = ArmEmulator(
        azurite=Azurite(
            blob_url=blob_account,
            account_name=local_azurite.STAGING_ACCOUNT,
            account_key=local_azurite.ACCOUNT_KEY,
            container=f"disk-exports-{uuid.uuid4().hex[:8]}",
        ),
        platform_images=PLATFORM_IMAGES,
        **settings,
    )
    arm.nic_reservation = NIC_RESERVATION
    return arm


# Copies in the emulator end after a few looks, not minutes: look often.
FAST_POLL = Backoff(first=0.05, most=0.2)


@asynccontextmanager
async def azure_worker(
    client: Client, arm_url: str, blob_account: str, secret: bytes, task_queue: str, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker in a process of its own (``tests.azure.azure_worker``) on an emulator, a log account and the
    deployment secret every worker of a build shares; stopped on the way out unless it is gone."""
    env = {
        **os.environ,
        "KILN_ARM_ENDPOINT": arm_url,
        "KILN_LOG_ACCOUNT": blob_account,
        "KILN_WORKER_SECRET": secret.hex(),
        "KILN_TEST_TASK_QUEUE": task_queue,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
    }
    async with worker_subprocess(client, task_queue, "tests.azure.azure_worker", env=env, log=log) as process:
        yield process


def os_profiles(*, pause: float = 0.05, **windows: Any) -> OsProfiles:
    """The OS profiles a test worker reaches its guests with: the real ones, with the pauses Windows steps make
    between their checks (``pause`` seconds) as short as the scripted Windows machines are quick; ``windows``
    sets more of the Windows profile (``max_restarts``, ``sysprep_limit``, ``fetch_above``)."""
    return OsProfiles(
        [
            LinuxProfile(),
            WindowsProfile(
                WinRmTransport(
                    WinRmSettings(operation_timeout=1, read_timeout=5, command_timeout=30), connect_seconds=10
                ),
                restart_timing=RestartTiming(check_every=pause, under_way_every=pause, retry_every=pause),
                poll_every=pause,
                **windows,
            ),
        ]
    )


def make_cloud(arm_url: str, blob_account: str, *, secret: bytes, **options: Any) -> AzureCloud:
    return AzureCloud(
        FakeAsyncCredential(KILN_PRINCIPAL),
        SUB,
        arm_endpoint=arm_url,
        client_options={**client_kwargs(arm_url), **options.pop("client_options", {})},
        blob_credential=local_azurite.credential(local_azurite.STAGING_ACCOUNT),
        secret=secret,
        egress_ip=options.pop("egress_ip", "127.0.0.1"),
        log_account=options.pop("log_account", blob_account),
        conflict_backoff=0.05,
        in_use_wait=IN_USE_WAIT,
        poll=options.pop("poll", FAST_POLL),
        **options,
    )


def owner_clients(arm_url: str) -> ArmClients:
    """Management clients of a principal the emulator treats as an Owner: for what the user makes before a build."""
    return ArmClients(FakeAsyncCredential(), SUB, arm_endpoint=arm_url, options=client_kwargs(arm_url))


def kiln_resources(arm: ArmEmulator, build_id: str | None = None) -> list[dict[str, Any]]:
    """What kiln made (and the emulator still has): everything tagged with a build id."""
    return arm.resources({"kilnBuildId": build_id})


def temporary(arm: ArmEmulator) -> list[dict[str, Any]]:
    return arm.resources({"kilnRole": "temporary"})


# ---------------------------------------------------------------------------------------------- guests


class AzureLikeVms(GuestVms):
    """Local VMs provisioned from an Azure osProfile: the admin user and its key, waagent, sudo and apt."""

    profiles: dict[str, GuestSpec] = {}

    def _prepare(self, build: Any, folder: Any, base: Path, data: dict, host_key: Any) -> None:
        super()._prepare(build, folder, base, data, host_key)
        spec = self.profiles[folder.path.name]
        layer = _Layer(folder.upper, base)
        user = spec.admin_username
        layer._append("etc/passwd", f"{user}:x:0:0:azure admin:/home/{user}:/bin/sh\n")
        layer._append("etc/shadow", f"{user}:*:19000:0:99999:7:::\n")
        keys = "".join(f"{k}\n" for k in spec.ssh_public_keys).encode()
        layer.write(f"home/{user}/.ssh/authorized_keys", keys, mode=0o600, folder_mode=0o700)
        layer.write("var/lib/kiln-test-guest/admin-user", f"{user}\n".encode(), mode=0o644)
        # waagent where Azure's images have it, which is where kiln's deprovision looks for it.
        layer.write("usr/sbin/waagent", WAAGENT.encode(), mode=0o755)
        for name, text in (("sudo", SUDO), ("apt", APT), ("apt-get", APT)):
            layer.write(f"usr/local/bin/{name}", text.encode(), mode=0o755)


async def guests_supported(state: Path) -> bool:
    """Real guests need root and an overlay whose lower layer is /."""
    return os.geteuid() == 0 and await overlay_works(Path("/"), state)


class Guests:
    """Boots a guest for each VM the emulator creates, and answers run commands for it.

    ``windows`` makes the settings of each Windows machine from its VM's spec (a fresh queue of updates, a slow
    restart); ``machines`` holds each Windows machine by its VM's name.
    """

    def __init__(self, state: Path, secret: bytes) -> None:
        self.state = state
        self.vms = AzureLikeVms(state=state, store=ResourceStore(state / "guests.db"), secret=secret)
        self.host_keys: dict[str, str] = {}
        self.booted: list[str] = []
        self.linux: dict[str, str] = {}  # the guest of each Linux VM, by the VM's vmId
        self.windows: Callable[[GuestSpec], MachineSettings] = lambda spec: MachineSettings()
        self.machines: dict[str, WindowsMachine] = {}
        self._by_vm_id: dict[str, WindowsMachine] = {}

    def attach(self, arm: ArmEmulator) -> None:
        arm.guest_factory = self.boot
        arm.run_command = self.run_command

    def boot(self, spec: GuestSpec) -> GuestEndpoint:
        if spec.os_type == "Windows":
            return self._boot_windows(spec)
        name = f"g{uuid.uuid4().hex[:12]}"
        self.vms.profiles[name] = spec
        build = BuildContext(build_id=spec.name, template_name="guest", location=LOCATION, cloud="azure")
        source = ResolvedSource(image_id="guest", exact_version="1")
        vm_spec = VmSpec(name=name, purpose="build", image_id="guest", source=source, vm_profile=VmProfile())
        vm = asyncio.run(self.vms.create(build, vm_spec, Path("/")))
        self.host_keys[spec.vm_id.lower()] = vm.host_key
        self.linux[spec.vm_id.lower()] = name
        self.booted.append(name)
        return GuestEndpoint(host=vm.host, port=22, close=lambda: asyncio.run(self.vms.delete(name)))

    def _boot_windows(self, spec: GuestSpec) -> GuestEndpoint:
        host = free_loopback_address(WINRM_HTTPS_PORT)
        machine = WindowsMachine(
            computer_name=spec.computer_name or spec.name[:15],
            admin_user=spec.admin_username or "",
            admin_password=spec.admin_password or "",
            host=host,
            folder=self.state / "windows" / spec.name,
            settings=self.windows(spec),
        )
        self.machines[spec.name] = machine
        self._by_vm_id[spec.vm_id.lower()] = machine
        return GuestEndpoint(host=host, port=WINRM_HTTPS_PORT, close=machine.delete)

    def run_command(self, vm_id: str, body: dict[str, Any]) -> tuple[str, str]:
        script = "\n".join(body.get("script") or [])
        if "ssh_host_ed25519_key.pub" in script:
            return self.host_keys.get(vm_id.lower(), "") + "\n", ""
        machine = self._by_vm_id.get(vm_id.lower())
        if (
            machine is not None
            and body.get("commandId") == "RunPowerShellScript"
            and "WSMan:\\localhost\\Listener" in script
        ):
            return f"{machine.enable_winrm()}\n", ""
        guest = self.linux.get(vm_id.lower())
        if guest is not None and body.get("commandId") == "RunShellScript":
            return self._run_shell_script(guest, script)
        return "", f"the test guest runs only shell scripts and the WinRM listener setup, not: {script}"

    def _run_shell_script(self, guest: str, script: str) -> tuple[str, str]:
        """As the VM agent runs it: as root, in the guest (its namespaces, entered from PID 1's)."""
        running = guest_vms.running(self.vms.folder(guest))
        if running is None:
            return "", "the VM agent is not running"
        done = subprocess.run(
            ["nsenter", "-t", str(running[0]), "-a", "sh", "-c", script], capture_output=True, timeout=60, check=False
        )
        return done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")

    def left_of(self, build_id: str) -> list[str]:
        """What is left of the guests of a build's Linux VMs: any still running, or still recorded."""
        left = []
        for name, spec in list(self.vms.profiles.items()):
            if spec.name.startswith(build_id):
                if guest_vms.running(self.vms.folder(name)) is not None:
                    left.append(f"the guest of {spec.name} still runs")
                left += [f"the guest of {spec.name}: record {record}" for record in self.vms.recorded(spec.name)]
        return left

    def close(self) -> None:
        """Deletes every guest still up (deleting one twice is fine)."""
        for name in self.booted:
            asyncio.run(self.vms.delete(name))
        for machine in self.machines.values():
            machine.delete()


# ---------------------------------------------------------------------------------------------- builds


@dataclass
class AzureHarness:
    """Workers on one task queue, building corpus templates against one emulator."""

    client: Client
    arm: ArmEmulator
    blob_account: str
    secret: bytes
    task_queue: str
    artifacts: Path
    workers: list[tuple[asyncio.Event, asyncio.Task[None], AzureCloud]]

    def start_worker(self, profiles: OsProfiles | None = None, **options: Any) -> AzureCloud:
        """A worker in this process; ``profiles`` are the OS profiles it reaches guests with (``os_profiles()``),
        ``options`` go to its cloud (``make_cloud``)."""
        cloud = make_cloud(self.arm.base_url, self.blob_account, secret=self.secret, **options)
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_worker(self.client, cloud, task_queue=self.task_queue, guests=profiles or os_profiles(), stop=stop)
        )
        self.workers.append((stop, task, cloud))
        return cloud

    async def stop_worker(self, index: int) -> None:
        stop, task, cloud = self.workers[index]
        stop.set()
        await task
        await cloud.close()

    async def stop_workers(self) -> None:
        for index, (_, task, _) in enumerate(self.workers):
            if not task.done():
                await self.stop_worker(index)

    async def start(self, template: dict[str, Any], name: str) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            ImageBuildWorkflow.run, template, id=f"{name}-{uuid.uuid4().hex[:6]}", task_queue=self.task_queue
        )

    async def finish(self, handle: WorkflowHandle[Any, Any]) -> BuildStatus:
        return await finish(handle)

    async def log(self, status: BuildStatus, name: str = "customization.log") -> str:
        """One of the build's logs, as its staging storage holds it."""
        blob = self.workers[0][2].blobs.blob(status.log_uri.rsplit("/", 1)[0] + f"/{name}")
        return (await (await blob.download_blob()).readall()).decode(errors="replace")

    async def wait_for_step(self, handle: WorkflowHandle[Any, Any], prefix: str, timeout: float = 120) -> BuildStatus:
        return await wait_for_step(handle, prefix, timeout)

    def corpus(self, name: str, *, parameters: dict[str, Any] | None = None, **extra: str) -> dict[str, Any]:
        """A corpus template with its <placeholders> set to emulator values and its artifacts made local; an ARM
        deployment template is resolved with ``parameters``, as ``kiln build`` does with a parameters file."""
        values = {
            "region": LOCATION,
            "region1": LOCATION,
            "region2": REGION2,
            "subscriptionID": SUB,
            "rgName": RG,
            "resourceGroupName": RG,
            "imageName": "goldenImage",
            "runOutputName": "output",
            "sharedImageGalName": GALLERY,
            "acgName": GALLERY,
            "imageDefName": "ubuntu",
            "imgBuilderId": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ManagedIdentity/"
            "userAssignedIdentities/aibIdentity",
            "vnetRgName": "vnetRG",
            "vnetName": "buildVnet",
            "subnetName": "buildSubnet",
            "srcImageName": "sourceImage",
            "scriptName": "validate script",
            "sigDefImgVersionId": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/galleries/"
            f"{GALLERY}/images/source/versions/latest",
            **extra,
        }
        text = (CORPUS / name).read_text()
        for key, value in values.items():
            text = text.replace(f"<{key}>", value)
        doc = json.loads(text)
        if is_arm_wrapper(doc):
            doc, _ = resolve_arm_wrapper(doc, parameters)
        return self._local_artifacts(doc)

    def _local_artifacts(self, node: Any) -> Any:
        """Remote scriptUri/sourceUri become files here (there is no internet), checksums updated to match."""
        if isinstance(node, list):
            return [self._local_artifacts(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: self._local_artifacts(v) for k, v in node.items()}
        for key in ("scriptUri", "sourceUri"):
            uri = node.get(key)
            if isinstance(uri, str) and not uri.startswith("file:"):
                script = WINDOWS_SCRIPT if node.get("type") == "PowerShell" else SCRIPT
                data = script if key == "scriptUri" else b"<h1>golden</h1>\n"
                path = self.artifacts / hashlib.sha256(uri.encode()).hexdigest()[:12]
                path.write_bytes(data)
                node[key] = path.as_uri()
                if node.get("sha256Checksum"):
                    node["sha256Checksum"] = hashlib.sha256(data).hexdigest()
        return node


async def prepare(arm_url: str, *, generation: str = "V1") -> None:
    """What the corpus templates expect to exist, made as the user would (an Owner): the destination group, a
    gallery and its image definitions, a source image and version, and a VNet with a subnet."""
    owner = owner_clients(arm_url)
    try:
        await _prepare(owner, arm_url, generation)
    finally:
        await owner.close()


async def make_gallery(
    arm_url: str,
    gallery: str,
    region: str,
    definitions: tuple[str, ...],
    *,
    generation: str = "V1",
    os_type: str = "Linux",
    features: list[dict[str, str]] | None = None,
) -> str:
    """A gallery in ``region`` (in the group ``RG``) with image definitions of ``os_type``, made as the user would;
    returns the gallery's id."""
    owner = owner_clients(arm_url)
    try:
        compute = owner.compute
        await owner.resource.resource_groups.create_or_update(RG, {"location": LOCATION})
        made = await (await compute.galleries.begin_create_or_update(RG, gallery, {"location": region})).result()
        for definition in definitions:
            properties: dict[str, Any] = {
                "osType": os_type,
                "osState": "Generalized",
                "hyperVGeneration": generation,
                "identifier": {"publisher": "kiln", "offer": definition, "sku": generation},
            }
            if features is not None:
                properties["features"] = features
            await (
                await compute.gallery_images.begin_create_or_update(
                    RG, gallery, definition, {"location": region, "properties": properties}
                )
            ).result()
    finally:
        await owner.close()
    return made.id


async def _prepare(owner: ArmClients, arm_url: str, generation: str) -> None:
    resource, compute, network = owner.resource, owner.compute, owner.network
    for group in (RG, "vnetRG"):
        await resource.resource_groups.create_or_update(group, {"location": LOCATION})
    await make_gallery(arm_url, GALLERY, LOCATION, ("ubuntu", "source"), generation=generation)
    await make_gallery(arm_url, GALLERY, LOCATION, ("windows",), generation=generation, os_type="Windows")
    image = await (
        await compute.images.begin_create_or_update(
            RG,
            "sourceImage",
            {
                "location": LOCATION,
                "properties": {
                    "hyperVGeneration": generation,
                    "storageProfile": {
                        "osDisk": {
                            "osType": "Linux",
                            "osState": "Generalized",
                            "blobUri": "https://src.blob.core.windows.net/vhds/a.vhd",
                        }
                    },
                },
            },
        )
    ).result()
    await (
        await compute.gallery_image_versions.begin_create_or_update(
            RG,
            GALLERY,
            "source",
            "1.0.0",
            {
                "location": LOCATION,
                "properties": {"storageProfile": {"source": {"id": image.id}}},
            },
        )
    ).result()
    await (
        await network.virtual_networks.begin_create_or_update(
            "vnetRG",
            "buildVnet",
            {
                "location": LOCATION,
                "properties": {
                    "addressSpace": {"addressPrefixes": ["10.1.0.0/16"]},
                    "subnets": [{"name": "buildSubnet", "properties": {"addressPrefix": "10.1.0.0/24"}}],
                },
            },
        )
    ).result()
