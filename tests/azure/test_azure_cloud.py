"""AzureCloud, method by method, against the ARM emulator with the real SDK clients and Azurite.

Each create is run twice (create-or-get), each delete twice (gone is done), and the failures that matter are
injected: conflicts while deleting, throttling with Retry-After, quota and permission errors.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from activities.clouds.aib.ids import platform_image_id
from activities.clouds.aib.names import staging_group_name
from activities.clouds.aib.tags import ROLE_OUTPUT, ROLE_TEMPORARY, blob_metadata, build_tags
from activities.clouds.azure import AzureCloud
from activities.clouds.azure.names import storage_account_name
from activities.clouds.azure.storage import ensure_container
from activities.clouds.azure.vm import IN_USE_WAIT
from activities.clouds.azure.waits import Backoff
from activities.clouds.base import PermanentError
from activities.clouds.local.host import run
from activities.guest.keys import windows_password
from tests.arm_emulator import ArmEmulator, GuestEndpoint, GuestSpec, PlatformImage
from tests.azure.environment import (
    LOCATION,
    REGION2,
    RG,
    SUB,
    Guests,
    kiln_resources,
    make_cloud,
    make_gallery,
    owner_clients,
)
from tests.azure_live.live_build import leftovers
from tests.fixtures import connect
from workflows.models import (
    Artifact,
    BuildContext,
    BuildStatus,
    BuildVm,
    CapturedImage,
    DistributeRequest,
    ResolvedSource,
    Staging,
    VmSpec,
)
from workflows.template import ManagedImageDistributor, VhdDistributor, VmProfile, parse_template


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


async def test_a_build_vm_open_to_the_internet_is_refused_before_anything_is_made(
    arm: ArmEmulator, blob_account: str
) -> None:
    """Closed by default: a worker that does not know its egress address refuses a build whose VM would get a
    public IP, naming both ways out; a template's own subnet needs no NSG and builds."""
    cloud = make_cloud(arm.base_url, blob_account, secret=b"s" * 32, egress_ip=None)
    try:
        with pytest.raises(PermanentError) as refused:
            await cloud.resolve_source(build_context(), template())
        assert refused.value.type == "InboundOpenToInternet"
        assert "KILN_EGRESS_IP" in refused.value.message and "vnetConfig.subnetId" in refused.value.message
        assert kiln_resources(arm) == []
        subnet = f"/subscriptions/{SUB}/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
        private = template(vmProfile={"vnetConfig": {"subnetId": subnet}})
        assert (await cloud.resolve_source(build_context(), private)).exact_version
    finally:
        await cloud.close()


async def test_a_worker_told_to_allow_any_source_opens_the_nsg_to_any_address(
    arm: ArmEmulator, blob_account: str
) -> None:
    cloud = make_cloud(arm.base_url, blob_account, secret=b"s" * 32, egress_ip=None, allow_any_source=True)
    try:
        build = build_context()
        await cloud.resolve_source(build, template())
        await cloud.create_staging(build)
        await cloud.vms.create_network(
            staging_group_name(build),
            _parts(build),
            location=LOCATION,
            tags={"kilnBuildId": build.build_id},
            subnet_id=None,
        )
        nsg = next(r for r in kiln_resources(arm, build.build_id) if r["type"].endswith("networkSecurityGroups"))
        assert {rule["properties"]["sourceAddressPrefix"] for rule in nsg["properties"]["securityRules"]} == {"*"}
        await cloud.delete_staging(build)
    finally:
        await cloud.close()


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


async def test_a_gallery_target_naming_a_region_twice_is_refused_when_the_source_is_resolved(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """ARM refuses a version whose target regions repeat one (terraform-provider-azurerm#7751): refused before
    anything is made, naming the field, however the region is spelt."""
    await make_gallery(arm.base_url, "gal", LOCATION, ("ubuntu",))
    gallery = f"/subscriptions/{SUB}/resourceGroups/aibImageRG/providers/Microsoft.Compute/galleries/gal"
    target = {
        "type": "SharedImage",
        "runOutputName": "sig",
        "galleryImageId": f"{gallery}/images/ubuntu",
        "targetRegions": [{"name": REGION2}, {"name": LOCATION}, {"name": "East US"}],
    }
    with pytest.raises(PermanentError, match=r"distribute\[0\]\.targetRegions\[2\]\.name: 'East US'") as caught:
        await cloud.resolve_source(build_context(), template(distribute=[target]))
    assert "targetRegions[1].name" in caught.value.message
    assert kiln_resources(arm) == []


async def test_a_gallery_target_that_takes_no_image_kiln_can_make_is_refused_when_the_source_is_resolved(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """A confidential definition takes no managed image, and a TrustedLaunch one takes only a TrustedLaunch VM's disk
    snapshots, which a TrustedLaunchSupported definition (a Gen2 one's default) does not take: one build cannot write
    both. Refused before anything is made, instead of after the build at distribution."""
    features = [{"name": "SecurityType", "value": "ConfidentialVM"}]
    gallery = await make_gallery(arm.base_url, "gal", LOCATION, ("strict",), generation="V2", features=features)
    features = [{"name": "SecurityType", "value": "TrustedLaunch"}]
    await make_gallery(arm.base_url, "gal", LOCATION, ("trusted",), generation="V2", features=features)
    await make_gallery(arm.base_url, "gal", LOCATION, ("default",), generation="V2")
    gen2 = {
        "type": "PlatformImage",
        "publisher": "Canonical",
        "offer": "0001-com-ubuntu-server-focal",
        "sku": "20_04-lts-gen2",
        "version": "latest",
    }

    def target(definition: str) -> dict:
        return {
            "type": "SharedImage",
            "runOutputName": definition,
            "galleryImageId": f"{gallery}/images/{definition}",
            "targetRegions": [{"name": LOCATION}],
        }

    with pytest.raises(
        PermanentError, match=r"distribute\[1\]\.galleryImageId: .*/strict is of security type ConfidentialVM"
    ):
        await cloud.resolve_source(build_context(), template(gen2, distribute=[target("default"), target("strict")]))
    with pytest.raises(
        PermanentError, match=r"distribute\[0\]\.galleryImageId: the definition is TrustedLaunchSupported"
    ):
        await cloud.resolve_source(build_context(), template(gen2, distribute=[target("default"), target("trusted")]))
    assert (
        await cloud.resolve_source(build_context(), template(gen2, distribute=[target("default")]))
    ).hyper_v_generation == "V2"
    assert kiln_resources(arm) == []


@pytest.mark.parametrize(
    ("source_security", "definition_security", "verdict"),
    [
        ("TrustedLaunchSupported", "TrustedLaunchSupported", None),
        ("TrustedLaunchSupported", "TrustedLaunch", None),
        ("TrustedLaunchSupported", "Standard", "write to a definition of security type TrustedLaunch or"),
        ("Standard", "TrustedLaunchSupported", None),
        ("Standard", "Standard", None),
        ("ConfidentialVMSupported", "ConfidentialVMSupported", "no confidential definition takes"),
        ("ConfidentialVMSupported", "Standard", "no confidential definition takes"),
    ],
)
async def test_source_and_gallery_definition_security_types_must_match(
    cloud: AzureCloud, arm: ArmEmulator, source_security: str, definition_security: str, verdict: str | None
) -> None:
    """AIB: source and distribution security types match. A TrustedLaunchSupported source goes only into a
    TrustedLaunchSupported definition, a confidential one into none kiln can write; refused before anything is made,
    at the target's path. A ManagedImage target of any such source is a Standard image, and taken."""
    arm.platform_images[("Contoso", "secure", "gen2")] = PlatformImage(
        versions=["1.0.0"], hyper_v_generation="V2", features={"SecurityType": source_security}
    )
    features = [{"name": "SecurityType", "value": definition_security}]
    gallery = await make_gallery(arm.base_url, "gal", LOCATION, ("golden",), generation="V2", features=features)
    source = {"type": "PlatformImage", "publisher": "Contoso", "offer": "secure", "sku": "gen2", "version": "latest"}
    shared = {
        "type": "SharedImage",
        "runOutputName": "golden",
        "galleryImageId": f"{gallery}/images/golden",
        "targetRegions": [{"name": LOCATION}],
    }
    if verdict is None:
        resolved = await cloud.resolve_source(build_context(), template(source, distribute=[shared]))
        assert resolved.security_type == source_security
        # Only a TrustedLaunch definition needs a TrustedLaunch build VM (and takes only its disks' snapshots).
        assert resolved.build_security_type == (
            "TrustedLaunch" if definition_security == "TrustedLaunch" else "Standard"
        )
    else:
        with pytest.raises(PermanentError, match=rf"distribute\[0\]\.galleryImageId: .* {verdict}") as caught:
            await cloud.resolve_source(build_context(), template(source, distribute=[shared]))
        assert f"does not match the source's, {source_security}" in caught.value.message
    managed = {
        "type": "ManagedImage",
        "runOutputName": "managed",
        "imageId": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/images/golden",
        "location": LOCATION,
    }
    assert (await cloud.resolve_source(build_context(), template(source, distribute=[managed]))).exact_version
    assert kiln_resources(arm) == []


async def test_a_source_that_runs_only_as_trusted_launch_is_refused_when_resolved(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """AIB does not build from a TrustedLaunch (or ConfidentialVM) source: its VM could not be captured."""
    arm.platform_images[("Contoso", "hardened", "tl-only")] = PlatformImage(
        versions=["1.0.0"], hyper_v_generation="V2", features={"SecurityType": "TrustedLaunch"}
    )
    source = {
        "type": "PlatformImage",
        "publisher": "Contoso",
        "offer": "hardened",
        "sku": "tl-only",
        "version": "latest",
    }
    with pytest.raises(
        PermanentError, match=r"properties.source: Contoso:hardened:tl-only:latest is of security type TrustedLaunch"
    ) as caught:
        await cloud.resolve_source(build_context(), template(source))
    assert caught.value.type == "UnsupportedSecurityType"


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


async def test_a_vm_whose_create_failed_is_made_again_once_azure_frees_its_nic(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """A create that fails for a passing reason leaves a Failed VM, which does not come right by being sent again.
    The step's retry deletes it and makes the VM anew under the same names; Azure holds the NIC for the failed VM
    a while (NicReservedForAnotherVm, 180 s on Azure), which the new create waits out."""
    boots: list[GuestSpec] = []

    def boot(spec: GuestSpec) -> GuestEndpoint:
        boots.append(spec)
        if len(boots) == 1:
            raise RuntimeError("the host the VM landed on went away")
        return GuestEndpoint()

    def host_key(vm_id: str, body: dict) -> tuple[str, str]:
        booted = arm.guest(vm_id) is not None  # only a VM whose guest came up answers
        return ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKiln host\n" if booted else "", "")

    arm.guest_factory, arm.run_command = boot, host_key
    build = build_context()
    staging = await cloud.create_staging(build)
    source = await cloud.resolve_source(build, template())
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=source.image_id, source=source, vm_profile=VmProfile()
    )
    with pytest.raises(HttpResponseError, match="OSProvisioningInternalError"):
        await cloud.create_vm(build, staging, spec)
    vm = await cloud.create_vm(build, staging, spec)  # the step's retry
    assert vm.host_key.startswith("ssh-ed25519 ") and len(boots) == 2
    await cloud.delete_vm(build, vm.name)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []


def test_by_default_kiln_waits_out_azures_180_second_nic_reservation() -> None:
    """The tests scale Azure's reservation and kiln's wait down alike; on Azure the wait must cover 180 s."""
    assert IN_USE_WAIT >= 180 + 30


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


async def test_a_user_staging_group_is_judged_by_what_it_holds_not_by_the_lagging_listing(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """/resources runs behind: what was deleted a moment ago is still listed there, and what was made a moment ago
    is not yet. Whether the group is empty is judged by each type's own listing."""
    group_id = f"/subscriptions/{SUB}/resourceGroups/reused"
    owner = owner_clients(arm.base_url)
    try:
        await owner.resource.resource_groups.create_or_update("reused", {"location": LOCATION})
        nsgs = owner.network.network_security_groups
        await (await nsgs.begin_create_or_update("reused", "gone", {"location": LOCATION})).result()
        arm.listing_lag = 3600
        await (await nsgs.begin_delete("reused", "gone")).result()
        build = build_context(staging_resource_group=group_id)
        assert (await cloud.create_staging(build)).created_group is False
        await cloud.delete_staging(build)
        await (await nsgs.begin_create_or_update("reused", "fresh", {"location": LOCATION})).result()
        with pytest.raises(PermanentError, match=r"must be empty .* such as .*/networkSecurityGroups/fresh"):
            await cloud.create_staging(build_context(staging_resource_group=group_id))
    finally:
        await owner.close()


async def test_what_an_undo_missed_is_deleted_though_the_lagging_listing_does_not_show_it_yet(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """A create whose undo was lost (its network made, never recorded) is still cleaned up with the staging group,
    found by the listings of each type kiln makes rather than by /resources, which does not show it yet."""
    build = build_context(staging_resource_group=f"/subscriptions/{SUB}/resourceGroups/my-staging")
    owner = owner_clients(arm.base_url)
    try:
        await owner.resource.resource_groups.create_or_update("my-staging", {"location": LOCATION})
    finally:
        await owner.close()
    await cloud.create_staging(build)
    arm.listing_lag = 3600
    await cloud.vms.create_network(
        "my-staging", _parts(build), location=LOCATION, tags=build_tags(build, role=ROLE_TEMPORARY), subnet_id=None
    )
    assert len(kiln_resources(arm, build.build_id)) == 5  # the staging account and the VM's network
    await cloud.delete_staging(build)
    assert kiln_resources(arm, build.build_id) == []


async def test_the_sweep_by_tag_deletes_a_closed_builds_temporaries_and_keeps_its_outputs(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    """The janitor's sweep of a closed build finds its staging group by the build-id tag alone: what no undo names
    (a VM network made, never recorded) goes with it, while the build's output and another build's staging stay."""
    closed, other = build_context(), build_context(build_id=f"other-{time.monotonic_ns() % 10**8:08d}")
    await cloud.create_staging(closed)
    await cloud.create_staging(other)
    group = staging_group_name(closed)
    await cloud.vms.create_network(
        group, _parts(closed), location=LOCATION, tags=build_tags(closed, role=ROLE_TEMPORARY), subnet_id=None
    )
    owner = owner_clients(arm.base_url)
    try:
        await owner.resource.resource_groups.create_or_update("aibImageRG", {"location": LOCATION})
        await owner.network.public_ip_addresses.begin_create_or_update(
            "aibImageRG", "output", {"location": LOCATION, "tags": build_tags(closed, role=ROLE_OUTPUT)}
        )
    finally:
        await owner.close()
    others_before = kiln_resources(arm, other.build_id)

    deleted = await cloud.delete_tagged(closed.build_id)

    assert [d.rsplit("/", 1)[-1] for d in deleted] == [group]
    assert [r["name"] for r in kiln_resources(arm, closed.build_id)] == ["output"]
    assert kiln_resources(arm, other.build_id) == others_before
    assert await cloud.delete_tagged(closed.build_id) == []


async def test_the_live_suites_leftover_check_reports_what_a_build_left(cloud: AzureCloud, arm: ArmEmulator) -> None:
    """The live suite's leak check can fail: what a build left in its staging group, and the group itself, are
    reported, found by each type's listing though /resources does not list them yet."""
    build = build_context()
    staging = await cloud.create_staging(build)
    arm.listing_lag = 3600
    group = staging_group_name(build)
    await cloud.vms.create_network(
        group, _parts(build), location=LOCATION, tags=build_tags(build, role=ROLE_TEMPORARY), subnet_id=None
    )
    status = BuildStatus(build_id=build.build_id, exact_staging_resource_group=staging.resource_group_id)
    left = await leftovers(cloud, status, logs_kept=False)
    assert sorted(i.split("/providers/")[-1].split("/")[1] for i in left if "/providers/" in i) == [
        "networkInterfaces",
        "networkSecurityGroups",
        "publicIPAddresses",
        "storageAccounts",
        "virtualNetworks",
    ]
    assert staging.resource_group_id in left
    await cloud.delete_vm(build, _parts(build).vm)
    await cloud.delete_staging(build)
    assert await leftovers(cloud, status, logs_kept=False) == []


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
            "OperationNotAllowed",
            409,
            "Creation of managed images are not supported for virtual machine with TrustedLaunch security type.",
            "OperationNotAllowed",
            "does not allow it",
        ),
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


async def linux_build_spec(
    cloud: AzureCloud, arm: ArmEmulator, guests: Guests, **spec: Any
) -> tuple[BuildContext, Staging, VmSpec]:
    """A build's staging and the spec of its Linux build VM (``spec``'s fields added), whose guest is a real SSH
    guest behind the emulator's VM."""
    arm.guest_factory = guests.boot
    arm.run_command = guests.run_command
    build = build_context()
    staging = await cloud.create_staging(build)
    source = await cloud.resolve_source(build, template())
    return build, staging, VmSpec(name=f"{build.build_id}-build", purpose="build", image_id=source.image_id,
                                  source=source, vm_profile=VmProfile(), **spec)  # fmt: skip


async def linux_build_vm(cloud: AzureCloud, arm: ArmEmulator, guests: Guests) -> tuple[BuildContext, Staging, BuildVm]:
    """A build's staging and its Linux build VM, a real SSH guest behind the emulator's VM."""
    build, staging, spec = await linux_build_spec(cloud, arm, guests)
    return build, staging, await cloud.create_vm(build, staging, spec)


async def test_a_vm_whose_address_is_already_gone_is_still_deleted(
    cloud: AzureCloud, arm: ArmEmulator, guests: Guests
) -> None:
    """A worker that died after the guest's loopback address was removed, before its record was forgotten: the
    next delete finds the address gone and succeeds, instead of failing (and being retried) forever."""
    build, staging, vm = await linux_build_vm(cloud, arm, guests)
    await run("ip", "addr", "del", f"{vm.host}/32", "dev", "lo")
    await cloud.delete_vm(build, vm.name)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []
    assert not guests.vms.folder(guests.booted[-1]).path.exists(), "the guest behind the VM was left running"
    assert vm.host not in (await run("ip", "-o", "-4", "addr", "show", "dev", "lo")).decode()


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


async def captured_snapshot(arm: ArmEmulator, build: BuildContext) -> CapturedImage:
    """What capture leaves in the staging group, made directly: an incremental snapshot of a disk; and the
    destination group the user made for outputs."""
    owner = owner_clients(arm.base_url)
    group = staging_group_name(build)
    try:
        await owner.resource.resource_groups.create_or_update("aibImageRG", {"location": LOCATION})
        disk = {"location": LOCATION, "properties": {"creationData": {"createOption": "Empty"}, "diskSizeGB": 30}}
        made = await (await owner.compute.disks.begin_create_or_update(group, "osdisk", disk)).result()
        snapshot = {
            "location": LOCATION,
            "properties": {
                "creationData": {"createOption": "Copy", "sourceResourceId": made.id},
                "incremental": True,
                "osType": "Linux",
            },
        }
        snap = await (await owner.compute.snapshots.begin_create_or_update(group, "snap", snapshot)).result()
    finally:
        await owner.close()
    return CapturedImage(id=snap.id, uri=snap.id, size_bytes=30 << 30, hyper_v_generation="V1")


async def test_a_copy_into_another_region_is_looked_at_every_15_s_backing_off_to_30_s(
    arm: ArmEmulator, blob_account: str
) -> None:
    """A snapshot's copy runs for minutes to hours and each look at it is a throttled ARM read: kiln looks every
    15 s at first and backs off to every 30 s, never more often."""
    pauses: list[float] = []

    async def record(seconds: float) -> None:
        pauses.append(seconds)

    cloud = make_cloud(arm.base_url, blob_account, secret=b"s" * 32, poll=Backoff(sleep=record))
    try:
        build = build_context()
        staging = await cloud.create_staging(build)
        image = await captured_snapshot(arm, build)
        arm.snapshot_copy_polls = 4
        target = ManagedImageDistributor(
            type="ManagedImage",
            run_output_name="elsewhere",
            image_id=f"/subscriptions/{SUB}/resourceGroups/aibImageRG/providers/Microsoft.Compute/images/elsewhere",
            location=REGION2,
        )
        source = ResolvedSource(image_id="x", exact_version="", hyper_v_generation="V1")
        request = DistributeRequest(build=build, staging=staging, image=image, source=source, target=target, index=0)
        output = await cloud.distribute(request, resume=None, progress=lambda point: None)
    finally:
        await cloud.close()
    assert output.artifact_id == target.image_id
    assert pauses == [15.0, 22.5, 30.0, 30.0]


async def test_a_revoked_gallery_version_leaves_latest_is_refused_and_is_deleted(
    cloud: AzureCloud, arm: ArmEmulator
) -> None:
    gallery = await make_gallery(arm.base_url, "revokeGallery", LOCATION, ("base",))
    owner = owner_clients(arm.base_url)
    try:
        disk = {"osType": "Linux", "osState": "Generalized", "blobUri": "https://src.blob.core.windows.net/vhds/a.vhd"}
        image = await (
            await owner.compute.images.begin_create_or_update(
                RG, "revokeSource", {"location": LOCATION, "properties": {"storageProfile": {"osDisk": disk}}}
            )
        ).result()
        made = {"location": LOCATION, "properties": {"storageProfile": {"source": {"id": image.id}}}}
        await (
            await owner.compute.gallery_image_versions.begin_create_or_update(
                RG, "revokeGallery", "base", "1.0.0", made
            )
        ).result()
    finally:
        await owner.close()
    version_id = f"{gallery}/images/base/versions/1.0.0"
    latest = template({"type": "SharedImageVersion", "imageVersionId": version_id.replace("1.0.0", "latest")})
    pinned = template({"type": "SharedImageVersion", "imageVersionId": version_id})
    assert (await cloud.resolve_source(build_context(), latest)).exact_version == "1.0.0"

    end = datetime(2026, 12, 31, tzinfo=UTC)
    await cloud.retire_image_version(version_id, end_of_life=end, exclude_from_latest=True, revoked="CVE-1")

    assert (await cloud.resolve_source(build_context(), pinned)).revoked == "CVE-1"
    with pytest.raises(PermanentError) as no_latest:  # the only version is excluded now
        await cloud.resolve_source(build_context(), latest)
    assert no_latest.value.type == "SourceImageNotFound"
    await cloud.delete_image_version(version_id)
    await cloud.delete_image_version(version_id)  # already gone: fine
    with pytest.raises(PermanentError):
        await cloud.resolve_source(build_context(), pinned)


async def test_a_vm_with_data_disks_holds_them_made_once_or_twice(
    cloud: AzureCloud, arm: ArmEmulator, guests: Guests
) -> None:
    """additionalDataDisks: the build VM's resources name each data disk, on the first create and on its retry,
    so a build whose VM delete fails part way still knows every disk to delete."""
    build, staging, spec = await linux_build_spec(cloud, arm, guests, data_disk_sizes_gb=[8, 16])
    vm = await cloud.create_vm(build, staging, spec)
    assert await cloud.create_vm(build, staging, spec) == vm  # the step's retry
    disks = [r.id.rsplit("/", 1)[1] for r in vm.resources if r.kind == "disk"]
    assert len(disks) == 3 and sum("data" in d.lower() for d in disks) == 2, disks
    await cloud.delete_vm(build, vm.name)
    await cloud.delete_staging(build)
    assert kiln_resources(arm) == []
