"""Fixtures for the Azure cloud against the ARM emulator, Azurite and real SSH guests.

The real Azure SDK clients (``.aio``) talk to the emulator over HTTP; only the token is fake. Blob data goes to
Azurite with its account key (Azurite takes no Entra tokens, hence ``AzureCloud``'s ``blob_credential``). A VM
the emulator creates gets a real guest: a local VM (``LocalVms``) whose root is an overlay on this machine's
own root, provisioned as Azure's agent would from the VM's osProfile (admin user, SSH key), with an
``waagent`` that deprovisions the admin user, and reachable on its own loopback address at port 22.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from activities.clouds.azure import AzureCloud
from activities.clouds.local import azurite as local_azurite
from activities.clouds.local.store import ResourceStore
from activities.clouds.local.vm import LocalVms, _Layer
from tests.arm_emulator import ArmEmulator, Azurite, FakeAsyncCredential, GuestEndpoint, GuestSpec, client_kwargs
from tests.arm_emulator.server import _Request, _Response
from tests.local.azurite_fixture import azurite  # noqa: F401  (the session's Azurite)
from workflows.models import BuildContext, ResolvedSource, VmSpec
from workflows.template import VmProfile

SUB = "6f1c2a9e-5b0d-4c47-9d43-0b6a3c2e7f10"
LOCATION = "eastus"
# Platform images the emulator lists (its real counterpart is the marketplace).
PLATFORM_IMAGES = {
    ("canonical", "ubuntuserver", "18.04-lts"): (["18.04.202401010", "18.04.202312120"], "V1"),
    ("canonical", "ubuntuserver", "16.04-lts"): (["16.04.202109280"], "V1"),
    ("canonical", "0001-com-ubuntu-server-focal", "20_04-lts-gen2"): (["20.04.202402010", "20.04.202310250"], "V2"),
}

_IMAGES_PATH = re.compile(
    r"^/subscriptions/[^/]+/providers/Microsoft\.Compute/locations/(?P<loc>[^/]+)/publishers/(?P<pub>[^/]+)"
    r"/artifacttypes/vmimage/offers/(?P<offer>[^/]+)/skus/(?P<sku>[^/]+)/versions(?:/(?P<version>[^/]+))?$",
    re.IGNORECASE,
)

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


class ImageArm(ArmEmulator):
    """The emulator plus the platform image catalogue (VirtualMachineImages list/get), which it lacks."""

    def _route(self, req: _Request) -> _Response:
        found = _IMAGES_PATH.match(req.path)
        if found is None or req.method != "GET":
            return super()._route(req)
        key = (found["pub"].lower(), found["offer"].lower(), found["sku"].lower())
        if key not in PLATFORM_IMAGES:
            return _Response(404, {"error": {"code": "NotFound", "message": f"Artifact: VMImage was not found."}})
        versions, generation = PLATFORM_IMAGES[key]
        base = req.path if found["version"] is None else req.path.rsplit("/", 1)[0]
        if found["version"] is None:
            return _Response(200, [{"name": v, "location": found["loc"], "id": f"{base}/{v}"} for v in versions])
        if found["version"] not in versions:
            return _Response(404, {"error": {"code": "NotFound", "message": "Artifact: VMImage was not found."}})
        return _Response(200, {
            "name": found["version"], "location": found["loc"], "id": req.path,
            "properties": {"osDiskImage": {"operatingSystem": "Linux"}, "hyperVGeneration": generation,
                           "architecture": "x64"},
        })


class AzureLikeVms(LocalVms):
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
        for name, text in (("waagent", WAAGENT), ("sudo", SUDO), ("apt", APT), ("apt-get", APT)):
            layer.write(f"usr/local/bin/{name}", text.encode(), mode=0o755)


def overlay_on_root_works(state: Path) -> bool:
    probe = Path(tempfile.mkdtemp(dir=state))
    for sub in ("u", "w", "m"):
        (probe / sub).mkdir()
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "-t", "overlay", "probe", "-o",
             f"lowerdir=/,upperdir={probe / 'u'},workdir={probe / 'w'}", str(probe / "m")],
            capture_output=True,
        )
        return done.returncode == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)


class Guests:
    """Boots a real SSH guest for each VM the emulator creates, and answers run commands for it."""

    def __init__(self, state: Path, secret: bytes) -> None:
        self.vms = AzureLikeVms(state=state, store=ResourceStore(state / "guests.db"), secret=secret)
        self.host_keys: dict[str, str] = {}
        self.booted: list[str] = []

    def boot(self, spec: GuestSpec) -> GuestEndpoint:
        if spec.os_type != "Linux":
            raise RuntimeError("the test guests run Linux only")
        name = f"g{uuid.uuid4().hex[:12]}"
        self.vms.profiles[name] = spec
        build = BuildContext(build_id=spec.name, template_name="guest", location=LOCATION, cloud="azure")
        source = ResolvedSource(image_id="guest", exact_version="1")
        vm_spec = VmSpec(name=name, purpose="build", image_id="guest", source=source, vm_profile=VmProfile())
        vm = asyncio.run(self.vms.create(build, vm_spec, Path("/")))
        self.host_keys[spec.vm_id.lower()] = vm.host_key
        self.booted.append(name)
        return GuestEndpoint(host=vm.host, port=22, close=lambda: asyncio.run(self.vms.delete(name)))

    def run_command(self, vm_id: str, body: dict[str, Any]) -> tuple[str, str]:
        script = "\n".join(body.get("script") or [])
        if "ssh_host_ed25519_key.pub" in script:
            return self.host_keys.get(vm_id.lower(), "") + "\n", ""
        return "", f"the test guest runs only the host key query, not: {script}"


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[Guests]:
    if os.geteuid() != 0 or not overlay_on_root_works(tmp_path):
        pytest.skip("real SSH guests need root and overlayfs over /")
    guests = Guests(tmp_path / "guests", os.urandom(32))
    yield guests
    for name in guests.booted:
        asyncio.run(guests.vms.delete(name))


@pytest.fixture
def blob_account(azurite: local_azurite.Azurite) -> str:  # noqa: F811
    return local_azurite.account_url(local_azurite.STAGING_ACCOUNT, base=azurite.endpoint)


@pytest.fixture
def arm(blob_account: str) -> Iterator[ImageArm]:
    emulator = ImageArm(
        azurite=Azurite(
            blob_url=blob_account,
            account_name=local_azurite.STAGING_ACCOUNT,
            account_key=local_azurite.ACCOUNT_KEY,
            container=f"disk-exports-{uuid.uuid4().hex[:8]}",
        )
    )
    with emulator:
        yield emulator


def make_cloud(arm: ArmEmulator, blob_account: str, *, secret: bytes, **options: Any) -> AzureCloud:
    return AzureCloud(
        FakeAsyncCredential(),
        SUB,
        arm_endpoint=arm.base_url,
        client_options=client_kwargs(arm.base_url, aio=True),
        blob_credential=local_azurite.credential(local_azurite.STAGING_ACCOUNT),
        secret=secret,
        egress_ip="127.0.0.1",
        log_account=options.pop("log_account", blob_account),
        conflict_backoff=0.05,
        **options,
    )


@pytest_asyncio.fixture
async def cloud(arm: ImageArm, blob_account: str) -> AsyncIterator[AzureCloud]:
    made = make_cloud(arm, blob_account, secret=os.urandom(32))
    yield made
    await made.close()


def kiln_resources(arm: ArmEmulator, build_id: str | None = None) -> list[dict[str, Any]]:
    """What kiln made (and the emulator still has): everything tagged with a build id."""
    return arm.resources({"kilnBuildId": build_id})
