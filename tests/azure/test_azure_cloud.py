"""AzureCloud, method by method, against the ARM emulator with the real SDK clients and Azurite.

Each create is run twice (create-or-get), each delete twice (gone is done), and the failures that matter are
injected: conflicts while deleting, throttling with Retry-After, quota and permission errors.
"""

from __future__ import annotations

import time

import pytest
from azure.core.exceptions import ResourceNotFoundError

from activities.clouds.aib.ids import platform_image_id
from activities.clouds.aib.names import staging_group_name
from activities.clouds.aib.tags import blob_metadata
from activities.clouds.azure import AzureCloud
from activities.clouds.azure.names import storage_account_name
from activities.clouds.azure.storage import ensure_container
from activities.clouds.base import PermanentError
from activities.guest.keys import windows_password
from tests.arm_emulator import ArmEmulator, GuestEndpoint, GuestSpec
from tests.azure.environment import LOCATION, SUB, Guests, kiln_resources
from tests.fixtures import connect
from workflows.models import Artifact, BuildContext, ResolvedSource, VmSpec
from workflows.template import VhdDistributor, VmProfile, parse_template


def build_context(**overrides: object) -> BuildContext:
    values: dict = {
        "build_id": f"unit-{time.monotonic_ns() % 10**8:08d}",
        "template_name": "helloImageTemplateLinux01",
        "location": LOCATION,
        "cloud": "azure",
        "destination_resource_group": "aibImageRG",
        "managed_resource_tags": {"team": "images"},
    }
    values.update(overrides)
    return BuildContext(**values)


def template(source: dict | None = None, **properties: object) -> object:
    return parse_template(
        {
            "location": LOCATION,
            "properties": {
                "source": source
                or {
                    "type": "PlatformImage",
                    "publisher": "Canonical",
                    "offer": "UbuntuServer",
                    "sku": "18.04-LTS",
                    "version": "latest",
                },
                "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
                **properties,
            },
        }
    )


async def test_resolve_platform_latest_to_newest_version(cloud: AzureCloud) -> None:
    source = await cloud.resolve_source(build_context(), template())
    assert source.exact_version == "18.04.202401010"
    assert source.hyper_v_generation == "V1" and source.os_type == "Linux"
    gen2 = await cloud.resolve_source(
        build_context(),
        template(
            {
                "type": "PlatformImage",
                "publisher": "Canonical",
                "offer": "0001-com-ubuntu-server-focal",
                "sku": "20_04-lts-gen2",
                "version": "latest",
            }
        ),
    )
    assert gen2.hyper_v_generation == "V2" and gen2.exact_version == "20.04.202402010"


async def test_resolve_unknown_image_is_permanent(cloud: AzureCloud) -> None:
    with pytest.raises(PermanentError, match="properties.source"):
        await cloud.resolve_source(
            build_context(),
            template({"type": "PlatformImage", "publisher": "Nobody", "offer": "x", "sku": "y", "version": "latest"}),
        )


async def test_a_windows_source_resolves_with_its_os_type(cloud: AzureCloud) -> None:
    """The OS type decides how the build VM is made and reached (a password and WinRM, not an SSH key)."""
    windows = {
        "type": "PlatformImage",
        "publisher": "MicrosoftWindowsServer",
        "offer": "WindowsServer",
        "sku": "2022-datacenter-azure-edition",
        "version": "latest",
    }
    source = await cloud.resolve_source(build_context(), template(windows))
    assert (source.os_type, source.exact_version, source.hyper_v_generation) == ("Windows", "20348.2227.240104", "V2")


async def test_a_gallery_target_that_cannot_be_written_is_refused_when_the_source_is_resolved(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """AIB's rules on distribution targets hold before anything is made: here, a gallery that does not exist."""
    gallery = f"/subscriptions/{SUB}/resourceGroups/aibImageRG/providers/Microsoft.Compute/galleries/nowhere"
    target = {
        "type": "SharedImage",
        "runOutputName": "sig",
        "galleryImageId": f"{gallery}/images/ubuntu",
        "targetRegions": [{"name": LOCATION}],
    }
    with pytest.raises(PermanentError, match=r"distribute\[0\]\.galleryImageId: the gallery .*nowhere does not exist"):
        await cloud.resolve_source(build_context(), template(distribute=[target]))
    assert kiln_resources(arm) == []


async def test_a_windows_vm_gets_a_derived_password_and_a_pinned_winrm_listener(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """The Windows build VM WinRM sessions reach: an admin password derived from the worker secret (never in the
    activity's result), WinRM over HTTPS turned on through the guest agent, its certificate pinned."""
    booted: list[GuestSpec] = []
    thumbprint = "0123456789abcdef0123456789abcdef01234567"

    def boot(spec: GuestSpec) -> GuestEndpoint:
        booted.append(spec)
        return GuestEndpoint(port=5986)

    def run_command(vm_id: str, body: dict) -> tuple[str, str]:
        script = "\n".join(body["script"])
        if body["commandId"] == "RunPowerShellScript" and "kiln-winrm-https" in script:
            return f"WinRM HTTPS listener ready\n{thumbprint}\n", ""
        return "", f"unexpected run command: {script}"

    arm.guest_factory, arm.run_command = boot, run_command
    build = build_context()
    staging = await cloud.create_staging(build)
    source = ResolvedSource(
        image_id=platform_image_id(
            SUB,
            LOCATION,
            "MicrosoftWindowsServer",
            "WindowsServer",
            "2022-datacenter-azure-edition",
            "20348.2227.240104",
        ),
        exact_version="20348.2227.240104",
        os_type="Windows",
        hyper_v_generation="V2",
    )
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=source.image_id, source=source, vm_profile=VmProfile()
    )
    vm = await cloud.create_vm(build, staging, spec)

    assert (vm.os_type, vm.port, vm.host_key) == ("Windows", 5986, f"winrm-sha1:{thumbprint.upper()}")
    [guest] = booted
    assert guest.os_type == "Windows" and guest.ssh_public_keys == ()
    assert guest.admin_password == windows_password(cloud.secret, build.build_id)
    assert guest.admin_password not in vm.model_dump_json()
    machine = next(r for r in kiln_resources(arm) if r["type"] == "Microsoft.Compute/virtualMachines")
    assert machine["properties"]["hardwareProfile"]["vmSize"] == "Standard_D2ds_v4"  # Gen2's default
    assert "adminPassword" not in machine["properties"]["osProfile"]

    await cloud.delete_vm(build, vm.name)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []


async def test_a_guest_that_can_never_boot_fails_the_create_at_once(cloud: AzureCloud, arm: ArmEmulator) -> None:
    """A guest whose image cannot start (here: no sshd in it) is an OS provisioning client error on Azure: the
    create fails on its first try with the guest's own reason, instead of being retried into a step timeout."""
    tries: list[GuestSpec] = []

    def boot(spec: GuestSpec) -> GuestEndpoint:
        tries.append(spec)
        raise PermanentError(
            "its root / has no /usr/sbin/sshd (Debian package openssh-server)", kind="GuestNotBootable"
        )

    arm.guest_factory = boot
    build = build_context()
    staging = await cloud.create_staging(build)
    source = await cloud.resolve_source(build, template())
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=source.image_id, source=source, vm_profile=VmProfile()
    )
    with pytest.raises(PermanentError) as failed:
        await cloud.create_vm(build, staging, spec)
    assert failed.value.type == "VmProvisioningFailed" and "openssh-server" in failed.value.message
    assert len(tries) == 1
    await cloud.delete_vm(build, spec.name)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []


async def test_staging_create_twice_delete_twice(cloud: AzureCloud, arm: ArmEmulator) -> None:
    build = build_context()
    first = await cloud.create_staging(build)
    second = await cloud.create_staging(build)
    assert first == second
    group_name = staging_group_name(build)
    assert len(group_name) <= 90 and group_name.startswith("IT_aibImageRG_helloImageTemplateLinux01_")
    group = next(r for r in arm.resources() if r["type"] == "Microsoft.Resources/resourceGroups")
    assert group["tags"] == {
        "team": "images",
        "createdBy": "kiln",
        "imageTemplateName": build.template_name,
        "imageTemplateResourceGroupName": "aibImageRG",
        "kilnBuildId": build.build_id,
        "kilnRole": "temporary",
    }
    account = next(r for r in arm.resources() if r["type"] == "Microsoft.Storage/storageAccounts")
    assert account["name"] == storage_account_name(build.build_id)
    assert account["properties"]["allowSharedKeyAccess"] is False

    staged = await cloud.stage_artifact(build, first, Artifact(source_uri="file:///x.sh", field="f"), b"echo hi\n")
    assert await cloud.read_staged(build, staged) == b"echo hi\n"
    log = await cloud.open_log(build, first, "customization.log")
    await log.append(b"one\n")
    again = await cloud.open_log(build, first, "customization.log")
    await again.append(b"two\n")
    assert log.uri.endswith(f"/packerlogs/{build.build_id}/customization.log")

    await cloud.delete_staging(build)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []


async def test_long_staging_names_fit_arm(cloud: AzureCloud) -> None:
    build = build_context(template_name="t" * 64, destination_resource_group="g" * 90)
    assert len(staging_group_name(build)) == 90
    await cloud.create_staging(build)
    await cloud.delete_staging(build)


async def test_user_staging_group_must_be_empty_and_is_kept(cloud: AzureCloud, arm: ArmEmulator) -> None:
    groups = cloud.arm.resource.resource_groups
    await groups.create_or_update("my-staging", {"location": LOCATION})
    await cloud.arm.network.network_security_groups.begin_create_or_update(
        "my-staging", "users-own", {"location": LOCATION}
    )
    build = build_context(staging_resource_group=f"/subscriptions/{SUB}/resourceGroups/my-staging")
    with pytest.raises(PermanentError, match=r"properties\.stagingResourceGroup"):
        await cloud.create_staging(build)

    await groups.create_or_update("empty-staging", {"location": LOCATION})
    build = build_context(staging_resource_group=f"/subscriptions/{SUB}/resourceGroups/empty-staging")
    staging = await cloud.create_staging(build)
    assert staging.created_group is False
    assert (await cloud.create_staging(build)).created_group is False  # its own account does not count
    await cloud.delete_staging(build)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []
    assert await groups.check_existence("empty-staging")


async def test_user_staging_group_made_when_missing_is_deleted(cloud: AzureCloud, arm: ArmEmulator) -> None:
    build = build_context(staging_resource_group=f"/subscriptions/{SUB}/resourceGroups/made-for-me")
    staging = await cloud.create_staging(build)
    assert staging.created_group is True
    await cloud.delete_staging(build)
    assert not await cloud.arm.resource.resource_groups.check_existence("made-for-me")


async def test_throttling_with_retry_after_is_honoured(cloud: AzureCloud, arm: ArmEmulator) -> None:
    fault = arm.faults.add(method="PUT", path_regex="/resourcegroups/IT_", status=429, retry_after=1, times=2)
    started = time.monotonic()
    await cloud.create_staging(build_context())
    assert fault.hits == 2
    assert time.monotonic() - started >= 2


@pytest.mark.parametrize(
    ("code", "status", "message", "kind", "named"),
    [
        (
            "QuotaExceeded",
            409,
            "Operation could not be completed as it results in exceeding approved standardDv2Family Cores quota.",
            "QuotaExceeded",
            "quota",
        ),
        ("OperationNotAllowed", 409, "Operation results in exceeding quota limits of Core.", "QuotaExceeded", "quota"),
        (
            "AuthorizationFailed",
            403,
            "The client does not have authorization to perform action 'Microsoft.Compute/virtualMachines/write'.",
            "AuthorizationFailed",
            "deploy/azure-role.json",
        ),
        (
            "LinkedAuthorizationFailed",
            403,
            "The client has permission to perform action on scope, however it does "
            "not have permission to perform action 'Microsoft.Network/virtualNetworks/subnets/join/action'.",
            "AuthorizationFailed",
            "deploy/azure-role.json",
        ),
    ],
)
async def test_quota_and_permission_fail_at_once_and_leave_nothing(
    cloud: AzureCloud, arm: ArmEmulator, code: str, status: int, message: str, kind: str, named: str
) -> None:
    build = build_context()
    staging = await cloud.create_staging(build)
    source = await cloud.resolve_source(build, template())
    fault = arm.faults.add(
        method="PUT", path_regex="/virtualMachines/", status=status, code=code, message=message, times=None
    )
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=source.image_id, source=source, vm_profile=VmProfile()
    )
    with pytest.raises(PermanentError, match=named) as caught:
        await cloud.create_vm(build, staging, spec)
    assert caught.value.type == kind
    assert fault.hits == 1  # not retried
    # The saga's undo entries, as the workflow runs them:
    await cloud.delete_vm(build, spec.name)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []


async def test_delete_conflicts_are_retried(cloud: AzureCloud, arm: ArmEmulator) -> None:
    build = build_context()
    await cloud.create_staging(build)
    parts_group = staging_group_name(build)
    network = cloud.arm.network
    await cloud.vms.create_network(
        parts_group, _parts(build), location=LOCATION, tags={"kilnBuildId": build.build_id}, subnet_id=None
    )
    fault = arm.faults.add(
        method="DELETE",
        path_regex="/networkSecurityGroups/",
        status=400,
        code="InUseNetworkSecurityGroupCannotBeDeleted",
        message="in use",
        times=2,
    )
    await cloud.delete_vm(build, _parts(build).vm)
    assert fault.hits == 2
    assert [r async for r in network.network_security_groups.list(parts_group)] == []
    await cloud.delete_staging(build)


def _parts(build: BuildContext):  # noqa: ANN202
    from activities.clouds.azure.names import VmParts

    return VmParts(f"{build.build_id}-build")


async def test_vm_create_twice_connect_and_delete_twice(cloud: AzureCloud, arm: ArmEmulator, guests: Guests) -> None:
    arm.guest_factory = guests.boot
    arm.run_command = guests.run_command
    build = build_context()
    staging = await cloud.create_staging(build)
    source = await cloud.resolve_source(build, template())
    spec = VmSpec(
        name=f"{build.build_id}-build",
        purpose="build",
        image_id=source.image_id,
        source=source,
        vm_profile=VmProfile(os_disk_size_gb=30),
    )
    vm = await cloud.create_vm(build, staging, spec)
    assert await cloud.create_vm(build, staging, spec) == vm
    assert vm.host_key.startswith("ssh-ed25519 ")
    made = arm.resources({"kilnBuildId": build.build_id})
    types = sorted(r["type"] for r in made)
    assert "Microsoft.Compute/virtualMachines" in types and "Microsoft.Network/publicIPAddresses" in types
    machine = next(r for r in made if r["type"] == "Microsoft.Compute/virtualMachines")
    assert machine["properties"]["hardwareProfile"]["vmSize"] == "Standard_D1_v2"
    assert machine["properties"]["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] is True
    nsg = next(r for r in made if r["type"] == "Microsoft.Network/networkSecurityGroups")
    assert {rule["properties"]["destinationPortRange"] for rule in nsg["properties"]["securityRules"]} == {"22", "5986"}
    assert {rule["properties"]["sourceAddressPrefix"] for rule in nsg["properties"]["securityRules"]} == {"127.0.0.1"}

    async with connect(cloud, build, vm) as guest:
        await guest.start_script("hello", "echo hello from $(id -un)\n")
        while (progress := await guest.poll_script("hello", 0)).exit_code is None:
            pass
        assert b"hello from" in progress.output

    await cloud.delete_vm(build, vm.name)
    await cloud.delete_vm(build, vm.name)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []


async def test_an_unfinished_vhd_is_deleted_only_if_the_build_wrote_it(cloud: AzureCloud, blob_account: str) -> None:
    """A VHD target's uri may name a blob someone else made; a failed build removes only its own."""
    build = build_context()
    theirs = VhdDistributor(type="VHD", run_output_name="theirs", uri=f"{blob_account}/vhds/{build.build_id}-a.vhd")
    mine = VhdDistributor(type="VHD", run_output_name="mine", uri=f"{blob_account}/vhds/{build.build_id}-b.vhd")
    await ensure_container(cloud.blobs, f"{blob_account}/vhds")
    await cloud.blobs.blob(theirs.uri).upload_blob(b"a user's disk")
    await cloud.blobs.blob(mine.uri).upload_blob(b"half a copy", metadata=blob_metadata(build.build_id))

    await cloud.delete_output(build, theirs, 0)
    await cloud.delete_output(build, mine, 1)
    await cloud.delete_output(build, mine, 1)  # gone is done

    assert await (await cloud.blobs.blob(theirs.uri).download_blob()).readall() == b"a user's disk"
    with pytest.raises(ResourceNotFoundError):
        await cloud.blobs.blob(mine.uri).get_blob_properties()
