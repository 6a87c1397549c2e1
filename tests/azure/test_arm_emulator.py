"""The ARM emulator, driven by the real azure-mgmt clients (sync and .aio) over HTTP.

These tests pin the protocol kiln's Azure cloud relies on: status codes and LRO headers per
operation, provisioningState transitions, retries of throttling and server errors, dependency
conflicts, async failures with their error codes, gallery replication status, disk export, and the
call log. Everything runs on 127.0.0.1; only the bearer token is fake.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceResponseError,
)
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as cm
from azure.mgmt.compute.aio import ComputeManagementClient as AioComputeManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.network.aio import NetworkManagementClient as AioNetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.mgmt.resource.resources.aio import (
    ResourceManagementClient as AioResourceManagementClient,
)
from azure.mgmt.storage import StorageManagementClient
from azure.storage.blob import BlobClient, BlobServiceClient

from activities.clouds.local import azurite as local_azurite
from tests.arm_emulator import (
    ArmEmulator,
    Azurite,
    FakeAsyncCredential,
    FakeCredential,
    GuestEndpoint,
    GuestSpec,
    PlatformImage,
    Role,
    client_kwargs,
)

SUB = "6f1c2a9e-5b0d-4c47-9d43-0b6a3c2e7f10"
LOC = "eastus"
ARM_PREFIX = f"/subscriptions/{SUB}/resourceGroups"
AUTH = {"Authorization": "Bearer fake"}  # for raw HTTP calls; the emulator takes any bearer token


@dataclass
class Clients:
    resource: ResourceManagementClient
    network: NetworkManagementClient
    compute: ComputeManagementClient
    storage: StorageManagementClient


@pytest.fixture
def arm() -> Iterator[ArmEmulator]:
    with ArmEmulator() as emulator:
        yield emulator


@pytest.fixture
def az(arm: ArmEmulator) -> Clients:
    kwargs = client_kwargs(arm.base_url)
    cred = FakeCredential()
    return Clients(
        ResourceManagementClient(cred, SUB, **kwargs),
        NetworkManagementClient(cred, SUB, **kwargs),
        ComputeManagementClient(cred, SUB, **kwargs),
        StorageManagementClient(cred, SUB, **kwargs),
    )


def make_group(az: Clients, name: str = "rg1", tags: dict[str, str] | None = None) -> None:
    az.resource.resource_groups.create_or_update(name, {"location": LOC, "tags": tags or {}})


def make_network(az: Clients, rg: str = "rg1") -> dict[str, str]:
    """NSG, VNet with a subnet on that NSG, public IP and NIC; returns their ids by kind."""
    net = az.network
    nsg = net.network_security_groups.begin_create_or_update(
        rg,
        "nsg1",
        {
            "location": LOC,
            "properties": {
                "securityRules": [
                    {
                        "name": "ssh",
                        "properties": {
                            "protocol": "Tcp",
                            "access": "Allow",
                            "direction": "Inbound",
                            "priority": 100,
                            "sourceAddressPrefix": "*",
                            "sourcePortRange": "*",
                            "destinationAddressPrefix": "*",
                            "destinationPortRange": "22",
                        },
                    }
                ]
            },
        },
    ).result()
    vnet = net.virtual_networks.begin_create_or_update(
        rg,
        "vnet1",
        {
            "location": LOC,
            "properties": {"addressSpace": {"addressPrefixes": ["10.0.0.0/16"]}},
        },
    ).result()
    subnet = net.subnets.begin_create_or_update(
        rg,
        "vnet1",
        "default",
        {
            "properties": {"addressPrefix": "10.0.0.0/24", "networkSecurityGroup": {"id": nsg.id}},
        },
    ).result()
    pip = net.public_ip_addresses.begin_create_or_update(
        rg,
        "pip1",
        {
            "location": LOC,
            "sku": {"name": "Standard"},
            "properties": {"publicIPAllocationMethod": "Static"},
        },
    ).result()
    nic = net.network_interfaces.begin_create_or_update(
        rg,
        "nic1",
        {
            "location": LOC,
            "properties": {
                "ipConfigurations": [
                    {
                        "name": "ipconfig1",
                        "properties": {"subnet": {"id": subnet.id}, "publicIPAddress": {"id": pip.id}},
                    }
                ]
            },
        },
    ).result()
    return {"nsg": nsg.id, "vnet": vnet.id, "subnet": subnet.id, "pip": pip.id, "nic": nic.id}


def vm_model(nic_id: str, *, computer_name: str = "vm1") -> cm.VirtualMachine:
    """A Linux VM as SDK models, so the hybrid models' REST serialization is what goes out."""
    return cm.VirtualMachine(
        location=LOC,
        hardware_profile=cm.HardwareProfile(vm_size="Standard_D2s_v5"),
        storage_profile=cm.StorageProfile(
            image_reference=cm.ImageReference(
                publisher="Canonical", offer="0001-com-ubuntu-server-jammy", sku="22_04-lts-gen2", version="latest"
            ),
            os_disk=cm.OSDisk(
                create_option="FromImage", managed_disk=cm.ManagedDiskParameters(storage_account_type="Standard_LRS")
            ),
        ),
        os_profile=cm.OSProfile(
            computer_name=computer_name,
            admin_username="kiln",
            linux_configuration=cm.LinuxConfiguration(
                disable_password_authentication=True,
                ssh=cm.SshConfiguration(
                    public_keys=[
                        cm.SshPublicKey(path="/home/kiln/.ssh/authorized_keys", key_data="ssh-ed25519 AAAAC3Nza kiln")
                    ]
                ),
            ),
        ),
        network_profile=cm.NetworkProfile(network_interfaces=[cm.NetworkInterfaceReference(id=nic_id)]),
    )


def make_vm(az: Clients, rg: str = "rg1") -> tuple[cm.VirtualMachine, dict[str, str]]:
    make_group(az, rg)
    ids = make_network(az, rg)
    return az.compute.virtual_machines.begin_create_or_update(rg, "vm1", vm_model(ids["nic"])).result(), ids


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def op_polls(arm: ArmEmulator) -> list[int]:
    """Statuses of the operation-status GETs in the call log."""
    return [c.status for c in arm.calls if "/operations/" in c.path]


# ---------------------------------------------------------------------------------------------- CRUD


def test_resource_group_create_get_list_delete(arm: ArmEmulator, az: Clients) -> None:
    groups = az.resource.resource_groups
    created = groups.create_or_update("kiln-rg", {"location": LOC, "tags": {"kiln-build": "b1"}})
    assert created.id == f"{ARM_PREFIX}/kiln-rg"
    assert arm.calls[-1].status == 201
    groups.create_or_update("kiln-rg", {"location": LOC, "tags": {"kiln-build": "b1"}})
    assert arm.calls[-1].status == 200
    groups.create_or_update("other", {"location": LOC})
    assert groups.check_existence("KILN-RG")  # ARM ids are case-insensitive
    assert groups.get("kiln-rg").tags == {"kiln-build": "b1"}
    assert [g.name for g in groups.list(filter="tagName eq 'kiln-build' and tagValue eq 'b1'")] == ["kiln-rg"]

    groups.begin_delete("kiln-rg").result()
    assert not groups.check_existence("kiln-rg")
    with pytest.raises(ResourceNotFoundError) as missing:
        groups.get("kiln-rg")
    assert missing.value.error.code == "ResourceGroupNotFound"
    with pytest.raises(ResourceNotFoundError) as no_group:
        az.network.network_security_groups.begin_create_or_update("kiln-rg", "nsg", {"location": LOC})
    assert no_group.value.error.code == "ResourceGroupNotFound"


def test_network_resources_create_get_delete(az: Clients) -> None:
    make_group(az)
    ids = make_network(az)
    net = az.network
    vnet = net.virtual_networks.get("rg1", "vnet1")
    assert [s.id for s in vnet.subnets] == [ids["subnet"]]
    subnet = net.subnets.get("rg1", "vnet1", "default")
    assert subnet.network_security_group.id == ids["nsg"]
    assert [c.id for c in subnet.ip_configurations] == [f"{ids['nic']}/ipConfigurations/ipconfig1"]
    assert net.public_ip_addresses.get("rg1", "pip1").ip_address == "127.0.0.1"
    nic = net.network_interfaces.get("rg1", "nic1")
    assert nic.ip_configurations[0].private_ip_address == "127.0.0.1"
    assert nic.provisioning_state == "Succeeded"
    assert net.network_security_groups.get("rg1", "nsg1").subnets[0].id == ids["subnet"]

    # Delete in dependency order; each one polls its operation to the end.
    assert net.network_interfaces.begin_delete("rg1", "nic1").result() is None
    net.public_ip_addresses.begin_delete("rg1", "pip1").result()
    net.subnets.begin_delete("rg1", "vnet1", "default").result()
    net.virtual_networks.begin_delete("rg1", "vnet1").result()
    net.network_security_groups.begin_delete("rg1", "nsg1").result()
    with pytest.raises(ResourceNotFoundError) as gone:
        net.network_interfaces.get("rg1", "nic1")
    assert gone.value.error.code == "ResourceNotFound"
    # Deleting what is already gone succeeds (204), as kiln's idempotent cleanup needs.
    assert net.network_interfaces.begin_delete("rg1", "nic1").result() is None


def test_storage_account_create_keys_delete(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    accounts = az.storage.storage_accounts
    params = {"location": LOC, "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"}
    account = accounts.begin_create("rg1", "kilnstaging1", params).result()
    assert account.provisioning_state == "Succeeded"
    assert account.primary_endpoints.blob == "https://kilnstaging1.blob.core.windows.net/"
    # Storage creation polls Location (202 ... 200), not an operation-status body.
    assert [c.status for c in arm.calls if "operationResults" in c.path] == [202, 200]
    assert accounts.list_keys("rg1", "kilnstaging1").as_dict()["keys"][0]["value"]
    with pytest.raises(HttpResponseError) as bad:
        accounts.begin_create("rg1", "Kiln_Staging", params)
    assert bad.value.error.code == "AccountNameInvalid"
    accounts.delete("rg1", "kilnstaging1")
    assert arm.calls[-1].status == 200
    accounts.delete("rg1", "kilnstaging1")
    assert arm.calls[-1].status == 204


def test_vm_lifecycle_run_command_deallocate_generalize(arm: ArmEmulator, az: Clients) -> None:
    arm.run_command = lambda vm_id, body: (f"ran {body['script'][0]} on {vm_id.rsplit('/', 1)[1]}", "")
    vm, ids = make_vm(az)
    vms = az.compute.virtual_machines
    assert vm.provisioning_state == "Succeeded"
    assert vm.os_profile.admin_username == "kiln"
    disk_name = vm.storage_profile.os_disk.name
    assert az.compute.disks.get("rg1", disk_name).disk_state == "Attached"
    assert az.network.network_interfaces.get("rg1", "nic1").virtual_machine.id == vm.id

    result = vms.begin_run_command("rg1", "vm1", {"commandId": "RunShellScript", "script": ["uptime"]}).result()
    assert "[stdout]\nran uptime on vm1" in result.value[0].message

    with pytest.raises(ResourceExistsError) as running:
        vms.generalize("rg1", "vm1")
    assert running.value.error.code == "OperationNotAllowed"
    vms.begin_deallocate("rg1", "vm1").result()
    vms.generalize("rg1", "vm1")
    codes = [s.code for s in vms.instance_view("rg1", "vm1").statuses]
    assert "PowerState/deallocated" in codes and "OSState/generalized" in codes
    expanded = vms.get("rg1", "vm1", expand="instanceView")
    assert "PowerState/deallocated" in [s.code for s in expanded.instance_view.statuses]
    assert az.compute.disks.get("rg1", disk_name).disk_state == "Reserved"

    vms.begin_delete("rg1", "vm1").result()
    assert az.compute.disks.get("rg1", disk_name).disk_state == "Unattached"  # deleteOption Detach
    az.compute.disks.begin_delete("rg1", disk_name).result()
    assert vms.begin_delete("rg1", "vm1").result() is None


def test_managed_run_command_reports_output(arm: ArmEmulator, az: Clients) -> None:
    arm.run_command = lambda vm_id, body: ("hello\n", "")
    make_vm(az)
    run = az.compute.virtual_machine_run_commands
    run.begin_create_or_update(
        "rg1",
        "vm1",
        "kiln-step",
        {
            "location": LOC,
            "properties": {"source": {"script": "echo hello"}},
        },
    ).result()
    view = run.get_by_virtual_machine("rg1", "vm1", "kiln-step", expand="instanceView").instance_view
    assert (view.execution_state, view.exit_code, view.output) == ("Succeeded", 0, "hello\n")


def test_image_snapshot_gallery_and_disk_export(arm: ArmEmulator, az: Clients) -> None:
    vm, _ = make_vm(az)
    compute = az.compute
    with pytest.raises(ResourceExistsError):
        compute.images.begin_create_or_update(
            "rg1", "img", {"location": LOC, "properties": {"sourceVirtualMachine": {"id": vm.id}}}
        )
    compute.virtual_machines.begin_deallocate("rg1", "vm1").result()
    compute.virtual_machines.generalize("rg1", "vm1")
    image = compute.images.begin_create_or_update(
        "rg1", "img", {"location": LOC, "properties": {"sourceVirtualMachine": {"id": vm.id}, "hyperVGeneration": "V2"}}
    ).result()
    assert image.storage_profile.os_disk.os_state == "Generalized"

    disk_id = vm.storage_profile.os_disk.managed_disk.id
    copy_disk = {"creationData": {"createOption": "Copy", "sourceResourceId": disk_id}}
    snap = compute.snapshots.begin_create_or_update("rg1", "snap", {"location": LOC, "properties": copy_disk}).result()
    assert snap.provisioning_state == "Succeeded" and snap.os_type == "Linux"
    # Disk and snapshot PUTs answer 202 (never 201), which is all the SDK accepts for them.
    assert any(c.method == "PUT" and c.path.endswith("/snapshots/snap") and c.status == 202 for c in arm.calls)

    access = compute.disks.begin_grant_access(
        "rg1", vm.storage_profile.os_disk.name, {"access": "Read", "durationInSeconds": 3600}
    ).result()
    assert compute.disks.get("rg1", vm.storage_profile.os_disk.name).disk_state == "ActiveSAS"
    vhd = BlobClient.from_blob_url(access.access_sas).download_blob().readall()
    assert len(vhd) == 1024 * 1024 + 512 and vhd[-512:-504] == b"conectix"
    compute.disks.begin_revoke_access("rg1", vm.storage_profile.os_disk.name).result()
    assert requests.get(access.access_sas, timeout=5).status_code == 404
    assert compute.snapshots.begin_grant_access("rg1", "snap", {"access": "Read", "durationInSeconds": 60}).result()

    compute.galleries.begin_create_or_update("rg1", "gal", {"location": LOC, "properties": {}}).result()
    compute.gallery_images.begin_create_or_update(
        "rg1",
        "gal",
        "def",
        {
            "location": LOC,
            "properties": {
                "osType": "Linux",
                "osState": "Generalized",
                "hyperVGeneration": "V2",
                "identifier": {"publisher": "kiln", "offer": "demo", "sku": "1"},
            },
        },
    ).result()
    version = compute.gallery_image_versions.begin_create_or_update(
        "rg1", "gal", "def", "1.0.0", {"location": LOC, "properties": {"storageProfile": {"source": {"id": image.id}}}}
    ).result()
    assert version.provisioning_state == "Succeeded"
    assert [v.name for v in compute.gallery_image_versions.list_by_gallery_image("rg1", "gal", "def")] == ["1.0.0"]


def test_snapshot_copy_start_to_another_region(arm: ArmEmulator, az: Clients) -> None:
    """CopyStart makes an incremental snapshot elsewhere from an incremental one, finishing over later GETs; the
    snapshots of one disk are copied one at a time; an image is made only from a finished copy in its own region."""
    vm, _ = make_vm(az)
    compute = az.compute
    disk = {"creationData": {"createOption": "Copy", "sourceResourceId": vm.storage_profile.os_disk.managed_disk.id}}
    full = compute.snapshots.begin_create_or_update("rg1", "full", {"location": LOC, "properties": disk}).result()
    snap = compute.snapshots.begin_create_or_update(
        "rg1", "snap", {"location": LOC, "properties": {**disk, "incremental": True}}
    ).result()
    start = {"createOption": "CopyStart", "sourceResourceId": snap.id}
    with pytest.raises(HttpResponseError, match="incremental"):
        compute.snapshots.begin_create_or_update(
            "rg1", "c", {"location": "westus2", "properties": {"creationData": start}}
        )
    with pytest.raises(HttpResponseError, match="must both be incremental"):  # the source too
        compute.snapshots.begin_create_or_update(
            "rg1",
            "c",
            {
                "location": "westus2",
                "properties": {"creationData": {**start, "sourceResourceId": full.id}, "incremental": True},
            },
        )
    image = {"osDisk": {"osType": "Linux", "osState": "Generalized", "snapshot": {"id": snap.id}}}
    with pytest.raises(HttpResponseError) as refused:
        compute.images.begin_create_or_update(
            "rg1", "img", {"location": "westus2", "properties": {"storageProfile": image}}
        )
    assert refused.value.status_code == 400
    arm.snapshot_copy_polls = 2
    body = {"location": "westus2", "properties": {"creationData": start, "incremental": True}}
    copy = compute.snapshots.begin_create_or_update("rg1", "copy", body).result()  # the LRO's final GET is a poll
    assert copy.location == "westus2" and copy.completion_percent < 100
    with pytest.raises(ResourceExistsError, match="one incremental snapshot of a particular disk at a time"):
        compute.snapshots.begin_create_or_update("rg1", "copy3", {**body, "location": "westus3"})
    image["osDisk"]["snapshot"]["id"] = copy.id
    with pytest.raises(HttpResponseError, match="complete"):
        compute.images.begin_create_or_update(
            "rg1", "img", {"location": "westus2", "properties": {"storageProfile": image}}
        )
    percents = [compute.snapshots.get("rg1", "copy").completion_percent for _ in range(2)]
    assert percents[0] < 100 and percents[1] == 100
    made = compute.images.begin_create_or_update(
        "rg1", "img", {"location": "westus2", "properties": {"storageProfile": image}}
    ).result()
    assert made.location == "westus2"
    # The first copy has finished: the next one may start.
    again = compute.snapshots.begin_create_or_update("rg1", "copy3", {**body, "location": "westus3"}).result()
    assert again.provisioning_state == "Succeeded"


def test_group_delete_deletes_everything_inside(arm: ArmEmulator, az: Clients) -> None:
    make_vm(az, "kiln-build")
    make_group(az, "keep")
    assert len(arm.resources()) > 8
    az.resource.resource_groups.begin_delete("kiln-build").result()
    assert [r["name"] for r in arm.resources()] == ["keep"]
    # Resource group delete is 202 + Location only, polled until 200.
    assert [c.status for c in arm.calls if "/operationresults/" in c.path] == [202, 200]


def test_resources_filter_by_tag(arm: ArmEmulator, az: Clients) -> None:
    make_group(az, "kiln-b1", tags={"kiln-build": "b1"})
    az.network.network_security_groups.begin_create_or_update(
        "kiln-b1", "nsg", {"location": LOC, "tags": {"kiln-build": "b1"}}
    ).result()
    az.network.network_security_groups.begin_create_or_update("kiln-b1", "untagged", {"location": LOC}).result()
    assert {r["name"] for r in arm.resources(tag_filter={"kiln-build": "b1"})} == {"kiln-b1", "nsg"}
    assert arm.resources(tag_filter={"kiln-build": "b2"}) == []
    assert [r.name for r in az.resource.resources.list(filter="tagName eq 'kiln-build'")] == ["nsg"]
    # A tag-filtered listing returns no tags (the spec's $filter description); an unfiltered one does.
    filtered = az.resource.resources.list(filter="tagName eq 'kiln-build' and tagValue eq 'b1'")
    assert [(r.name, r.tags) for r in filtered] == [("nsg", None)]
    assert {r.name: r.tags for r in az.resource.resources.list_by_resource_group("kiln-b1")}["nsg"] == {
        "kiln-build": "b1"
    }


def test_the_listing_of_every_resource_runs_behind(arm: ArmEmulator, az: Clients) -> None:
    """/resources comes from a regional cache: new resources appear late, deleted ones linger; the per-type
    listings, served by the resource providers, do not lag."""
    make_group(az)
    net = az.network.network_security_groups
    net.begin_create_or_update("rg1", "old", {"location": LOC}).result()
    arm.listing_lag = 3600
    net.begin_create_or_update("rg1", "new", {"location": LOC}).result()
    net.begin_delete("rg1", "old").result()
    assert [r.name for r in az.resource.resources.list_by_resource_group("rg1")] == ["old"]
    assert [r.name for r in az.resource.resources.list()] == ["old"]
    assert [n.name for n in net.list("rg1")] == ["new"]
    arm.listing_lag = 0
    assert [r.name for r in az.resource.resources.list_by_resource_group("rg1")] == ["new"]


# ---------------------------------------------------------------------------------------------- RBAC


def restricted(arm: ArmEmulator, *actions: str, not_actions: tuple[str, ...] = ()) -> Clients:
    """Clients of a principal that holds only `actions` (minus `not_actions`)."""
    arm.roles["restricted"] = Role(actions, not_actions)
    cred = FakeCredential("restricted")
    kwargs = client_kwargs(arm.base_url)
    return Clients(
        ResourceManagementClient(cred, SUB, **kwargs),
        NetworkManagementClient(cred, SUB, **kwargs),
        ComputeManagementClient(cred, SUB, **kwargs),
        StorageManagementClient(cred, SUB, **kwargs),
    )


def test_a_missing_action_is_refused_before_anything_is_made(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    ids = make_network(az)
    limited = restricted(arm, "Microsoft.Compute/virtualMachines/read", "Microsoft.Network/*")
    with pytest.raises(HttpResponseError) as refused:
        limited.compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm_model(ids["nic"]))
    assert refused.value.status_code == 403 and refused.value.error.code == "AuthorizationFailed"
    assert "'Microsoft.Compute/virtualMachines/write'" in refused.value.message
    assert not any(r["type"] == "Microsoft.Compute/virtualMachines" for r in arm.resources())
    # Authorization comes before existence, as in ARM: a read of nothing allowed is 404, of nothing denied 403.
    with pytest.raises(ResourceNotFoundError):
        limited.compute.virtual_machines.get("rg1", "missing")
    with pytest.raises(HttpResponseError, match="AuthorizationFailed"):
        limited.compute.disks.get("rg1", "missing")


def test_a_snapshot_of_a_disk_needs_begin_get_access_on_the_disk(arm: ArmEmulator, az: Clients) -> None:
    """Copying a managed disk into a snapshot is authorized on the disk too: a linked check (Azure/OpenShift#186)."""
    vm, _ = make_vm(az)
    disk_id = vm.storage_profile.os_disk.managed_disk.id
    body = {"location": LOC, "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": disk_id}}}
    limited = restricted(arm, "Microsoft.Compute/snapshots/*", "Microsoft.Compute/disks/read")
    with pytest.raises(HttpResponseError) as refused:
        limited.compute.snapshots.begin_create_or_update("rg1", "snap", body)
    assert refused.value.status_code == 403 and refused.value.error.code == "LinkedAuthorizationFailed"
    assert (
        "'Microsoft.Compute/disks/beginGetAccess/action'" in refused.value.message and disk_id in refused.value.message
    )
    allowed = restricted(arm, "Microsoft.Compute/snapshots/*", "Microsoft.Compute/disks/beginGetAccess/action")
    assert allowed.compute.snapshots.begin_create_or_update("rg1", "snap", body).result().provisioning_state == (
        "Succeeded"
    )


def test_joining_a_subnet_is_a_linked_action_and_not_actions_subtract(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    ids = make_network(az)
    nic = {
        "location": LOC,
        "properties": {"ipConfigurations": [{"name": "ip", "properties": {"subnet": {"id": ids["subnet"]}}}]},
    }
    limited = restricted(
        arm, "Microsoft.Network/*", not_actions=("Microsoft.Network/virtualNetworks/subnets/join/action",)
    )
    with pytest.raises(HttpResponseError) as refused:
        limited.network.network_interfaces.begin_create_or_update("rg1", "nic2", nic)
    assert refused.value.error.code == "LinkedAuthorizationFailed" and ids["subnet"] in refused.value.message
    assert (
        restricted(arm, "Microsoft.Network/*")
        .network.network_interfaces.begin_create_or_update("rg1", "nic2", nic)
        .result()
    )


# ---------------------------------------------------------------------------------------------- LROs


def test_lro_polls_through_provisioning_states(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    arm.operation_polls = 3
    poller = az.network.network_security_groups.begin_create_or_update("rg1", "nsg", {"location": LOC})
    nsg = poller.result()
    assert nsg.provisioning_state == "Succeeded"
    assert op_polls(arm) == [200, 200, 200, 200]  # three InProgress, then Succeeded
    put = next(c for c in arm.calls if c.method == "PUT" and c.path.endswith("/nsg"))
    assert put.status == 201


def test_lro_intermediate_state_is_visible(arm: ArmEmulator, az: Clients) -> None:
    """A hung operation shows its transitional state until the test releases it."""
    make_group(az)
    ids = make_network(az)
    hang = arm.faults.slow_operation(method="PUT", path_regex="/virtualMachines/", polls=None)
    poller = az.compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm_model(ids["nic"]))
    wait_until(lambda: len(op_polls(arm)) >= 3)
    assert not poller.done() and poller.status() == "InProgress"
    assert az.compute.virtual_machines.get("rg1", "vm1").provisioning_state == "Creating"
    hang.polls = 0
    assert poller.result(timeout=10).provisioning_state == "Succeeded"


def test_lro_headers_per_operation_kind(arm: ArmEmulator, az: Clients) -> None:
    """The initial LRO answers carry exactly the headers arm.md prescribes per operation kind."""
    make_group(az)
    url = f"{arm.base_url}{ARM_PREFIX}/rg1/providers/Microsoft.Network/networkSecurityGroups/nsg?api-version=2026-03-01"
    put = requests.put(url, json={"location": LOC}, headers=AUTH, timeout=5)
    assert put.status_code == 201 and "Azure-AsyncOperation" in put.headers and "Location" not in put.headers
    assert put.headers["Azure-AsyncOperation"].startswith(arm.base_url)
    assert put.json()["properties"]["provisioningState"] == "Updating"
    delete = requests.delete(url, headers=AUTH, timeout=5)
    assert delete.status_code == 202 and delete.content == b""
    assert {"Azure-AsyncOperation", "Location", "retry-after-ms"} <= set(delete.headers)
    location = delete.headers["Location"]
    assert requests.get(location, headers=AUTH, timeout=5).status_code == 202
    assert requests.get(location, headers=AUTH, timeout=5).status_code == 200
    assert requests.get(location, headers=AUTH, timeout=5).status_code == 200  # still answers after completion
    no_version = requests.get(url.split("?")[0], headers=AUTH, timeout=5)
    assert no_version.json()["error"]["code"] == "MissingApiVersionParameter"
    anonymous = requests.get(url, timeout=5)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "AuthenticationFailed"


# ---------------------------------------------------------------------------------------------- faults


def test_429_with_retry_after_is_retried(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    fault = arm.faults.add(method="PUT", path_regex="/networkSecurityGroups/", status=429, retry_after=1, times=2)
    started = time.monotonic()
    nsg = az.network.network_security_groups.begin_create_or_update("rg1", "nsg", {"location": LOC}).result()
    assert nsg.provisioning_state == "Succeeded"
    assert fault.hits == 2
    assert [c.status for c in arm.calls if c.method == "PUT" and "nsg" in c.path] == [429, 429, 201]
    assert time.monotonic() - started >= 2  # the SDK slept Retry-After each time


def test_500_is_retried_then_succeeds_or_exhausts(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    az.network.network_security_groups.begin_create_or_update("rg1", "nsg", {"location": LOC}).result()
    arm.faults.add(method="GET", path_regex="/nsg$", status=500, times=2)
    assert az.network.network_security_groups.get("rg1", "nsg").name == "nsg"
    assert [c.status for c in arm.calls if c.method == "GET" and c.path.endswith("/nsg")][-3:] == [500, 500, 200]

    arm.faults.add(method="GET", path_regex="/nsg$", status=503, times=None)
    with pytest.raises(HttpResponseError) as exhausted:
        az.network.network_security_groups.get("rg1", "nsg")
    assert exhausted.value.status_code == 503
    assert [c.status for c in arm.calls if c.path.endswith("/nsg")][-4:] == [503] * 4  # 1 + 3 retries


def test_lro_poll_throttled_is_retried(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    arm.faults.add(method="GET", path_regex="/operations/", status=429, retry_after=1, times=1)
    assert az.network.network_security_groups.begin_create_or_update("rg1", "nsg", {"location": LOC}).result()
    assert op_polls(arm)[0] == 429


def test_post_is_not_retried_on_429_without_retry_after(arm: ArmEmulator, az: Clients) -> None:
    make_vm(az)
    arm.faults.add(method="POST", path_regex="/deallocate$", status=429)
    with pytest.raises(HttpResponseError) as throttled:
        az.compute.virtual_machines.begin_deallocate("rg1", "vm1")
    assert throttled.value.status_code == 429 and throttled.value.error.code == "TooManyRequests"


def test_dropped_connection_is_retried_for_get(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    arm.faults.add(method="GET", path_regex="/resourcegroups/rg1$", drop=True, status=None, times=1)
    assert az.resource.resource_groups.get("rg1").name == "rg1"
    arm.faults.add(method="PATCH", path_regex="/resourcegroups/rg1$", drop=True, status=None, times=1)
    with pytest.raises(ServiceResponseError):
        az.resource.resource_groups.update("rg1", {"tags": {"a": "b"}})


def test_injected_conflict_raises_resource_exists(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    arm.faults.add(method="PUT", path_regex="/publicIPAddresses/", status=409, code="AnotherOperationInProgress")
    with pytest.raises(ResourceExistsError) as conflict:
        az.network.public_ip_addresses.begin_create_or_update("rg1", "pip", {"location": LOC})
    assert conflict.value.error.code == "AnotherOperationInProgress"
    # times=1: the next call goes through.
    assert az.network.public_ip_addresses.begin_create_or_update("rg1", "pip", {"location": LOC}).result()


def test_fault_after_skips_earlier_calls(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    arm.faults.add(method="PUT", path_regex="/networkSecurityGroups/", status=400, code="InvalidParameter", after=1)
    az.network.network_security_groups.begin_create_or_update("rg1", "first", {"location": LOC}).result()
    with pytest.raises(HttpResponseError) as second:
        az.network.network_security_groups.begin_create_or_update("rg1", "second", {"location": LOC})
    assert second.value.error.code == "InvalidParameter"


def test_in_use_resources_refuse_deletion(arm: ArmEmulator, az: Clients) -> None:
    vm, ids = make_vm(az)
    net = az.network
    with pytest.raises(HttpResponseError) as nsg:
        net.network_security_groups.begin_delete("rg1", "nsg1")
    assert nsg.value.status_code == 400 and nsg.value.error.code == "InUseNetworkSecurityGroupCannotBeDeleted"
    assert ids["subnet"] in nsg.value.error.message
    with pytest.raises(HttpResponseError) as nic:
        net.network_interfaces.begin_delete("rg1", "nic1")
    assert nic.value.error.code == "NicInUse"
    with pytest.raises(HttpResponseError) as subnet:
        net.subnets.begin_delete("rg1", "vnet1", "default")
    assert subnet.value.error.code == "InUseSubnetCannotBeDeleted"
    with pytest.raises(ResourceExistsError) as disk:
        az.compute.disks.begin_delete("rg1", vm.storage_profile.os_disk.name)
    assert disk.value.status_code == 409 and disk.value.error.code == "OperationNotAllowed"

    # Take things apart in order and every delete goes through (once Azure frees the NIC the VM used, which the
    # test of NIC reservations covers).
    arm.nic_reservation = 0
    az.compute.virtual_machines.begin_delete("rg1", "vm1").result()
    net.network_interfaces.begin_delete("rg1", "nic1").result()
    net.subnets.begin_delete("rg1", "vnet1", "default").result()
    net.network_security_groups.begin_delete("rg1", "nsg1").result()


def test_failed_async_operation_surfaces_its_code(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    ids = make_network(az)
    arm.faults.fail_operation(
        method="PUT",
        path_regex="/virtualMachines/vm1$",
        code="QuotaExceeded",
        message="Operation could not be completed as it results in exceeding approved quota.",
    )
    poller = az.compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm_model(ids["nic"]))
    with pytest.raises(HttpResponseError) as failed:
        poller.result()
    assert failed.value.error.code == "QuotaExceeded" and failed.value.status_code == 200
    assert poller.status() == "Failed"
    assert az.compute.virtual_machines.get("rg1", "vm1").provisioning_state == "Failed"

    arm.faults.fail_operation(method="POST", path_regex="/deallocate$", code="AuthorizationFailed", polls=1)
    with pytest.raises(HttpResponseError) as denied:
        az.compute.virtual_machines.begin_deallocate("rg1", "vm1").result()
    assert denied.value.error.code == "AuthorizationFailed"

    # Resource group delete reports through Location, so the failure is the poll's HTTP status.
    arm.faults.fail_operation(method="DELETE", path_regex="/resourcegroups/rg1$", code="OperationNotAllowed")
    with pytest.raises(HttpResponseError) as refused:
        az.resource.resource_groups.begin_delete("rg1").result()
    assert refused.value.status_code == 409 and "OperationNotAllowed" in str(refused.value)
    assert az.resource.resource_groups.check_existence("rg1")


def test_hung_operation_never_finishes(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    arm.faults.slow_operation(method="DELETE", path_regex="/resourcegroups/rg1$", polls=None)
    poller = az.resource.resource_groups.begin_delete("rg1")
    poller.wait(timeout=0.5)
    assert not poller.done() and poller.status() == "InProgress"
    assert len([c for c in arm.calls if "/operationresults/" in c.path]) > 3
    assert az.resource.resource_groups.get("rg1").properties.provisioning_state == "Deleting"


def test_snake_case_body_is_refused(arm: ArmEmulator, az: Clients) -> None:
    """The current SDKs send a dict verbatim, and real Azure would silently ignore snake_case keys;
    the emulator refuses them so such a bug fails here rather than building the wrong resource."""
    make_group(az)
    url = f"{arm.base_url}{ARM_PREFIX}/rg1/providers/Microsoft.Network/publicIPAddresses/pip?api-version=2026-03-01"
    snake = {"location": LOC, "properties": {"public_ip_allocation_method": "Static"}}
    bad = requests.put(url, json=snake, headers=AUTH, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "InvalidRequestContent"
    flat = requests.put(url, json={"location": LOC, "publicIPAllocationMethod": "Static"}, headers=AUTH, timeout=5)
    assert flat.status_code == 400 and "properties" in flat.json()["error"]["message"]


def test_security_types_as_trusted_launch_as_default_sets_them(arm: ArmEmulator, az: Clients) -> None:
    """A Gen2 VM is TrustedLaunch unless Standard is asked for, and no managed image is made from a TrustedLaunch
    VM (hashicorp/packer#13189); a Gen2 gallery definition is TrustedLaunchSupported unless it says otherwise."""
    arm.platform_images = {JAMMY: PlatformImage(versions=["22.04.1"], hyper_v_generation="V2")}
    make_group(az)
    ids = make_network(az)
    compute = az.compute
    vm = compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm_model(ids["nic"])).result()
    assert vm.security_profile.security_type == "TrustedLaunch"
    compute.virtual_machines.begin_deallocate("rg1", "vm1").result()
    compute.virtual_machines.generalize("rg1", "vm1")
    body = {"location": LOC, "properties": {"sourceVirtualMachine": {"id": vm.id}, "hyperVGeneration": "V2"}}
    with pytest.raises(ResourceExistsError) as refused:
        compute.images.begin_create_or_update("rg1", "img", body)
    assert refused.value.error.code == "OperationNotAllowed" and "TrustedLaunch security type" in refused.value.message

    arm.nic_reservation = 0
    compute.virtual_machines.begin_delete("rg1", "vm1").result()
    standard = vm_model(ids["nic"], computer_name="vm2")
    standard.security_profile = cm.SecurityProfile(security_type="Standard")
    vm2 = compute.virtual_machines.begin_create_or_update("rg1", "vm2", standard).result()
    assert vm2.security_profile.security_type == "Standard"
    compute.virtual_machines.begin_deallocate("rg1", "vm2").result()
    compute.virtual_machines.generalize("rg1", "vm2")
    body["properties"]["sourceVirtualMachine"]["id"] = vm2.id
    image = compute.images.begin_create_or_update("rg1", "img", body).result()

    compute.galleries.begin_create_or_update("rg1", "gal", {"location": LOC}).result()

    def definition(name: str, features: list[dict[str, str]] | None = None) -> cm.GalleryImage:
        properties: dict[str, Any] = {
            "osType": "Linux",
            "osState": "Generalized",
            "hyperVGeneration": "V2",
            "identifier": {"publisher": "p", "offer": "o", "sku": name},
        }
        if features is not None:
            properties["features"] = features
        return compute.gallery_images.begin_create_or_update(
            "rg1", "gal", name, {"location": LOC, "properties": properties}
        ).result()

    supported = definition("supported")
    assert [(f.name, f.value) for f in supported.features] == [("SecurityType", "TrustedLaunchSupported")]
    versions = compute.gallery_image_versions
    from_vm = {"location": LOC, "properties": {"storageProfile": {"source": {"virtualMachineId": vm2.id}}}}
    with pytest.raises(HttpResponseError, match="only Vhd Blob, User Image and Gallery Image Version sources"):
        versions.begin_create_or_update("rg1", "gal", "supported", "1.0.0", from_vm)
    from_image = {"location": LOC, "properties": {"storageProfile": {"source": {"id": image.id}}}}
    made = versions.begin_create_or_update("rg1", "gal", "supported", "1.0.0", from_image).result()
    assert made.provisioning_state == "Succeeded"
    definition("trusted", [{"name": "SecurityType", "value": "TrustedLaunch"}])
    with pytest.raises(HttpResponseError, match="'TrustedLaunch' is not supported for the source id"):
        versions.begin_create_or_update("rg1", "gal", "trusted", "1.0.0", from_image)


# ---------------------------------------------------------------------------------------------- replication


def gallery_version_body(image_id: str) -> dict[str, Any]:
    return {
        "location": LOC,
        "properties": {
            "publishingProfile": {
                "targetRegions": [
                    {"name": "eastus", "regionalReplicaCount": 1},
                    {"name": "westus2", "regionalReplicaCount": 2},
                ]
            },
            "storageProfile": {"source": {"id": image_id}},
        },
    }


def make_gallery_image(az: Clients) -> str:
    vm, _ = make_vm(az)
    az.compute.virtual_machines.begin_deallocate("rg1", "vm1").result()
    az.compute.virtual_machines.generalize("rg1", "vm1")
    image = az.compute.images.begin_create_or_update(
        "rg1", "img", {"location": LOC, "properties": {"sourceVirtualMachine": {"id": vm.id}}}
    ).result()
    az.compute.galleries.begin_create_or_update("rg1", "gal", {"location": LOC}).result()
    az.compute.gallery_images.begin_create_or_update(
        "rg1",
        "gal",
        "def",
        {
            "location": LOC,
            "properties": {
                "osType": "Linux",
                "osState": "Generalized",
                "identifier": {"publisher": "p", "offer": "o", "sku": "s"},
            },
        },
    ).result()
    return image.id


def test_gallery_version_reports_per_region_replication(arm: ArmEmulator, az: Clients) -> None:
    image_id = make_gallery_image(az)
    slow = arm.faults.slow_replication(polls=None, regions=["westus2"])
    versions = az.compute.gallery_image_versions

    def regions() -> dict[str, tuple[str, int]]:
        status = versions.get("rg1", "gal", "def", "1.0.0", expand="ReplicationStatus").replication_status
        return {s.region: (s.state, s.progress) for s in status.summary}

    poller = versions.begin_create_or_update("rg1", "gal", "def", "1.0.0", gallery_version_body(image_id))
    assert versions.get("rg1", "gal", "def", "1.0.0").replication_status is None  # only with $expand
    # eastus needs the default single InProgress poll; westus2 waits for the test.
    wait_until(lambda: regions()["eastus"] == ("Completed", 100))
    state, progress = regions()["westus2"]
    assert state == "Replicating" and 0 < progress < 100
    status = versions.get("rg1", "gal", "def", "1.0.0", expand="ReplicationStatus").replication_status
    assert status.aggregated_state == "InProgress"
    assert versions.get("rg1", "gal", "def", "1.0.0").provisioning_state == "Creating"
    assert not poller.done()

    slow.polls = 0
    assert poller.result(timeout=10).provisioning_state == "Succeeded"
    status = versions.get("rg1", "gal", "def", "1.0.0", expand="ReplicationStatus").replication_status
    assert status.aggregated_state == "Completed"
    assert regions() == {"eastus": ("Completed", 100), "westus2": ("Completed", 100)}


def test_gallery_version_region_rules(arm: ArmEmulator, az: Clients) -> None:
    """A version lives in one of its target regions, names each once, and is made from a source in its region."""
    image_id = make_gallery_image(az)  # in eastus
    versions = az.compute.gallery_image_versions

    def refused(body: dict[str, Any]) -> str:
        with pytest.raises(HttpResponseError) as caught:
            versions.begin_create_or_update("rg1", "gal", "def", "1.0.0", body)
        assert caught.value.status_code == 400 and caught.value.error.code == "InvalidParameter"
        return caught.value.message

    body = gallery_version_body(image_id)
    body["properties"]["publishingProfile"]["targetRegions"] = [{"name": "westus2"}]
    assert "must contain the location of image version 'eastus'" in refused(body)
    body["properties"]["publishingProfile"]["targetRegions"] = [{"name": "East US"}, {"name": "eastus"}]
    assert "more than once" in refused(body)
    body = gallery_version_body(image_id)
    body["location"] = "westus2"
    assert "must be in the version's region 'westus2'" in refused(body)
    assert not any(r["type"].endswith("/versions") for r in arm.resources())


def test_a_shallow_gallery_version_is_there_at_once_in_its_own_region_only(arm: ArmEmulator, az: Clients) -> None:
    """Shallow replication refers to the source instead of copying it: no replication to wait for, even where a
    Full copy is slow, and so only the version's own region, one replica."""
    image_id = make_gallery_image(az)  # in eastus
    arm.faults.slow_replication(polls=None, regions=["westus2"])
    arm.operation_polls = 50  # a Full version would still be copying long after this test ends
    versions = az.compute.gallery_image_versions
    body = gallery_version_body(image_id)
    profile = body["properties"]["publishingProfile"]
    profile["replicationMode"] = "Shallow"
    with pytest.raises(HttpResponseError, match="Shallow replication is supported only in the image version's own"):
        versions.begin_create_or_update("rg1", "gal", "def", "1.0.0", body)
    profile["targetRegions"] = [{"name": "eastus", "regionalReplicaCount": 2}]
    with pytest.raises(HttpResponseError, match="one replica"):
        versions.begin_create_or_update("rg1", "gal", "def", "1.0.0", body)
    profile["targetRegions"] = [{"name": "eastus", "regionalReplicaCount": 1}]
    made = versions.begin_create_or_update("rg1", "gal", "def", "1.0.0", body).result(timeout=10)
    assert made.provisioning_state == "Succeeded"
    assert made.publishing_profile.replication_mode == "Shallow"
    assert versions.get("rg1", "gal", "def", "1.0.0").publishing_profile.replication_mode == "Shallow"
    body["properties"]["publishingProfile"] = {"targetRegions": [{"name": "eastus"}]}
    full = versions.begin_create_or_update("rg1", "gal", "def", "2.0.0", body)
    assert versions.get("rg1", "gal", "def", "2.0.0").publishing_profile.replication_mode == "Full"  # the default
    assert versions.get("rg1", "gal", "def", "2.0.0").provisioning_state == "Creating"
    assert not full.done()


def test_gallery_version_regional_replication_failure(arm: ArmEmulator, az: Clients) -> None:
    image_id = make_gallery_image(az)
    arm.faults.slow_replication(
        polls=1,
        regions=["westus2"],
        fail_code="ReplicationFailed",
        fail_message="Replication to westus2 failed: storage unavailable.",
    )
    versions = az.compute.gallery_image_versions
    with pytest.raises(HttpResponseError) as failed:
        versions.begin_create_or_update("rg1", "gal", "def", "1.0.0", gallery_version_body(image_id)).result()
    assert failed.value.error.code == "ReplicationFailed"
    status = versions.get("rg1", "gal", "def", "1.0.0", expand="ReplicationStatus").replication_status
    assert status.aggregated_state == "Failed"
    assert {s.region: s.state for s in status.summary} == {"eastus": "Completed", "westus2": "Failed"}


# ---------------------------------------------------------------------------------------------- call log


def test_call_log_counts_each_exchange(arm: ArmEmulator, az: Clients) -> None:
    make_group(az)
    arm.calls.clear()
    az.network.network_security_groups.begin_create_or_update("rg1", "nsg", {"location": LOC}).result()
    nsg = f"{ARM_PREFIX}/rg1/providers/Microsoft.Network/networkSecurityGroups/nsg"
    assert [(c.method, c.status) for c in arm.calls] == [("PUT", 201), ("GET", 200), ("GET", 200), ("GET", 200)]
    assert arm.calls[0].path == nsg and arm.calls[-1].path == nsg
    assert "/providers/Microsoft.Network/locations/eastus/operations/" in arm.calls[1].path


# ---------------------------------------------------------------------------------------------- guests


class _BannerServer(socketserver.ThreadingTCPServer):
    """Stands in for a guest's sshd: answers with an SSH identification string."""

    daemon_threads = True
    allow_reuse_address = True


class _Banner(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"SSH-2.0-kiln_guest\r\n")


def test_guest_factory_serves_the_vm_address(arm: ArmEmulator, az: Clients) -> None:
    specs: list[GuestSpec] = []
    servers: list[_BannerServer] = []

    def factory(spec: GuestSpec) -> GuestEndpoint:
        specs.append(spec)
        server = _BannerServer(("127.0.0.1", 0), _Banner)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

        def close() -> None:
            server.shutdown()
            server.server_close()

        return GuestEndpoint("127.0.0.1", server.server_address[1], close)

    arm.guest_factory = factory
    vm, _ = make_vm(az)
    assert specs[0].admin_username == "kiln" and specs[0].ssh_public_keys == ("ssh-ed25519 AAAAC3Nza kiln",)
    assert specs[0].os_type == "Linux" and specs[0].image_reference["offer"] == "0001-com-ubuntu-server-jammy"
    host = az.network.public_ip_addresses.get("rg1", "pip1").ip_address
    assert host == az.network.network_interfaces.get("rg1", "nic1").ip_configurations[0].private_ip_address
    endpoint = arm.guest("vm1")
    assert endpoint is not None and endpoint.host == host
    with socket.create_connection((host, endpoint.port), timeout=5) as conn:
        assert conn.recv(64).startswith(b"SSH-2.0-")

    az.compute.virtual_machines.begin_delete("rg1", "vm1").result()
    assert arm.guest("vm1") is None
    with pytest.raises(OSError):
        socket.create_connection((host, endpoint.port), timeout=1).close()


def test_guest_that_fails_to_boot_fails_the_vm_creation(arm: ArmEmulator, az: Clients) -> None:
    def broken(spec: GuestSpec) -> GuestEndpoint:
        raise RuntimeError("no rootfs")

    arm.guest_factory = broken
    with pytest.raises(HttpResponseError) as failed:
        make_vm(az)
    assert failed.value.error.code == "OSProvisioningInternalError" and "no rootfs" in failed.value.error.message
    assert az.compute.virtual_machines.get("rg1", "vm1").provisioning_state == "Failed"


def test_a_nic_stays_reserved_for_its_vm_after_the_vm_is_gone(arm: ArmEmulator, az: Clients) -> None:
    """For `nic_reservation` seconds (180 on Azure) after its VM is deleted, or failed to create, a NIC cannot be
    deleted or given to another VM (gardenlinux#4133, microsoft/AzureTRE#4511)."""
    arm.nic_reservation = 0.3
    vm, ids = make_vm(az)
    az.compute.virtual_machines.begin_delete("rg1", "vm1").result()
    with pytest.raises(HttpResponseError) as reserved:
        az.network.network_interfaces.begin_delete("rg1", "nic1")
    assert reserved.value.status_code == 400 and reserved.value.error.code == "NicReservedForAnotherVm"
    assert vm.id in reserved.value.message
    with pytest.raises(HttpResponseError, match="NicReservedForAnotherVm"):  # the same name, another VM
        az.compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm_model(ids["nic"]))
    time.sleep(arm.nic_reservation)
    again = az.compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm_model(ids["nic"])).result()
    assert again.provisioning_state == "Succeeded" and again.vm_id != vm.vm_id

    def broken(spec: GuestSpec) -> GuestEndpoint:
        raise RuntimeError("no rootfs")

    arm.guest_factory = broken
    body = vm_model(ids["nic"], computer_name="vm2")
    body.network_profile.network_interfaces = [cm.NetworkInterfaceReference(id=ids["nic"], delete_option="Delete")]
    az.compute.virtual_machines.begin_delete("rg1", "vm1").result()
    time.sleep(arm.nic_reservation)
    with pytest.raises(HttpResponseError, match="OSProvisioningInternalError"):
        az.compute.virtual_machines.begin_create_or_update("rg1", "vm2", body).result()
    # The failed VM never took its NIC: deleting the VM leaves it, reserved, though it was to go with the VM.
    az.compute.virtual_machines.begin_delete("rg1", "vm2").result()
    assert az.network.network_interfaces.get("rg1", "nic1").virtual_machine is None
    with pytest.raises(HttpResponseError, match="NicReservedForAnotherVm"):
        az.network.network_interfaces.begin_delete("rg1", "nic1")
    time.sleep(arm.nic_reservation)
    az.network.network_interfaces.begin_delete("rg1", "nic1").result()
    assert not any(r["type"] == "Microsoft.Network/networkInterfaces" for r in arm.resources())


# ---------------------------------------------------------------------------------------------- platform images

JAMMY = ("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2")
PLAN = {
    "name": "cis-ubuntu2204-l1",
    "product": "cis-ubuntu-linux-2204-l1",
    "publisher": "center-for-internet-security-inc",
}


def test_platform_image_catalogue_lists_and_gets(arm: ArmEmulator, az: Clients) -> None:
    arm.platform_images = {
        JAMMY: PlatformImage(
            versions=["22.04.202309190", "22.04.202402010", "22.04.202310250"], hyper_v_generation="V2"
        ),
        (PLAN["publisher"], PLAN["product"], PLAN["name"]): PlatformImage(
            versions=["1.0.0"], plan=PLAN, locations=("West Europe",)
        ),
        ("MicrosoftWindowsServer", "WindowsServer", "2022-datacenter"): PlatformImage(
            versions=["20348.2227.240104"], os_type="Windows"
        ),
    }
    images = az.compute.virtual_machine_images
    listed = images.list("East US", "canonical", "0001-com-ubuntu-server-jammy", "22_04-LTS-gen2")
    assert [i.name for i in listed] == ["22.04.202309190", "22.04.202310250", "22.04.202402010"]
    assert listed[0].location == "eastus"
    assert listed[0].id == (
        f"/Subscriptions/{SUB}/Providers/Microsoft.Compute/Locations/eastus/Publishers/canonical"
        "/ArtifactTypes/VMImage/Offers/0001-com-ubuntu-server-jammy/Skus/22_04-LTS-gen2"
        "/Versions/22.04.202309190"
    )
    latest = images.list(LOC, *JAMMY, orderby="name desc", top=1)
    assert [i.name for i in latest] == ["22.04.202402010"]

    image = images.get(LOC, *JAMMY, "22.04.202402010")
    assert (image.name, image.hyper_v_generation, image.architecture) == ("22.04.202402010", "V2", "x64")
    assert image.os_disk_image.operating_system == "Linux" and image.plan is None
    windows = images.get(LOC, "MicrosoftWindowsServer", "WindowsServer", "2022-datacenter", "20348.2227.240104")
    assert (windows.os_disk_image.operating_system, windows.hyper_v_generation) == ("Windows", "V1")
    cis = images.get("westeurope", PLAN["publisher"], PLAN["product"], PLAN["name"], "1.0.0")
    assert (cis.plan.publisher, cis.plan.product, cis.plan.name) == (PLAN["publisher"], PLAN["product"], PLAN["name"])

    for missing in (
        lambda: images.list(LOC, "Canonical", "0001-com-ubuntu-server-jammy", "no-such-sku"),
        lambda: images.get(LOC, *JAMMY, "22.04.000000000"),
        lambda: images.get(LOC, PLAN["publisher"], PLAN["product"], PLAN["name"], "1.0.0"),
    ):  # westeurope only
        with pytest.raises(ResourceNotFoundError) as not_found:
            missing()
        assert not_found.value.error.code == "NotFound"
        assert not_found.value.error.message == "Artifact: VMImage was not found."


def test_vm_from_a_plan_image_needs_the_plan(arm: ArmEmulator, az: Clients) -> None:
    arm.platform_images[(PLAN["publisher"], PLAN["product"], PLAN["name"])] = PlatformImage(
        versions=["1.0.0"], plan=PLAN
    )
    make_group(az)
    vm = vm_model(make_network(az)["nic"])
    vm.storage_profile.image_reference = cm.ImageReference(
        publisher=PLAN["publisher"], offer=PLAN["product"], sku=PLAN["name"], version="1.0.0"
    )
    with pytest.raises(HttpResponseError) as refused:
        az.compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm)
    assert refused.value.status_code == 400 and refused.value.error.code == "VMMarketplaceInvalidInput"
    vm.plan = cm.Plan(**PLAN)
    made = az.compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm).result()
    assert made.provisioning_state == "Succeeded" and made.plan.name == PLAN["name"]


# ---------------------------------------------------------------------------------------------- async clients


async def test_async_clients_create_poll_and_delete(arm: ArmEmulator) -> None:
    kwargs = client_kwargs(arm.base_url)
    async with (
        FakeAsyncCredential() as cred,
        AioResourceManagementClient(cred, SUB, **kwargs) as resource,
        AioNetworkManagementClient(cred, SUB, **client_kwargs(arm.base_url)) as network,
        AioComputeManagementClient(cred, SUB, **client_kwargs(arm.base_url)) as compute,
    ):
        await resource.resource_groups.create_or_update("rg1", {"location": LOC})
        arm.faults.add(method="PUT", path_regex="/networkInterfaces/", status=429, retry_after=1, times=1)
        nsg = await (
            await network.network_security_groups.begin_create_or_update("rg1", "nsg", {"location": LOC})
        ).result()
        vnet = await (
            await network.virtual_networks.begin_create_or_update(
                "rg1",
                "vnet",
                {
                    "location": LOC,
                    "properties": {
                        "addressSpace": {"addressPrefixes": ["10.1.0.0/16"]},
                        "subnets": [
                            {
                                "name": "s",
                                "properties": {"addressPrefix": "10.1.0.0/24", "networkSecurityGroup": {"id": nsg.id}},
                            }
                        ],
                    },
                },
            )
        ).result()
        nic = await (
            await network.network_interfaces.begin_create_or_update(
                "rg1",
                "nic",
                {
                    "location": LOC,
                    "properties": {
                        "ipConfigurations": [{"name": "ip", "properties": {"subnet": {"id": vnet.subnets[0].id}}}]
                    },
                },
            )
        ).result()
        vm = await (await compute.virtual_machines.begin_create_or_update("rg1", "vm1", vm_model(nic.id))).result()
        assert vm.provisioning_state == "Succeeded"
        out = await (
            await compute.virtual_machines.begin_run_command(
                "rg1", "vm1", {"commandId": "RunShellScript", "script": ["true"]}
            )
        ).result()
        assert out.value[0].code == "ProvisioningState/succeeded"

        arm.faults.fail_operation(method="POST", path_regex="/powerOff$", code="OperationNotAllowed")
        with pytest.raises(HttpResponseError) as failed:
            await (await compute.virtual_machines.begin_power_off("rg1", "vm1")).result()
        assert failed.value.error.code == "OperationNotAllowed"

        with pytest.raises(HttpResponseError) as in_use:
            await network.network_security_groups.begin_delete("rg1", "nsg")
        assert in_use.value.error.code == "InUseNetworkSecurityGroupCannotBeDeleted"
        await (await resource.resource_groups.begin_delete("rg1")).result()
    assert arm.resources() == []
    assert [c.status for c in arm.calls if c.method == "PUT" and "/networkInterfaces/" in c.path] == [429, 201]


# ---------------------------------------------------------------------------------------------- Azurite


@pytest.fixture
def emulator_azurite(azurite: local_azurite.Azurite) -> Azurite:  # noqa: F811
    """The session's Azurite, seen through its staging account."""
    return Azurite(
        local_azurite.account_url(local_azurite.STAGING_ACCOUNT, base=azurite.endpoint),
        account_name=local_azurite.STAGING_ACCOUNT,
        account_key=local_azurite.ACCOUNT_KEY,
    )


def test_disk_export_and_storage_endpoints_in_azurite(emulator_azurite: Azurite) -> None:
    azurite = emulator_azurite
    with ArmEmulator(azurite=azurite) as arm:
        kwargs = client_kwargs(arm.base_url)
        az = Clients(
            *(
                cls(FakeCredential(), SUB, **kwargs)
                for cls in (
                    ResourceManagementClient,
                    NetworkManagementClient,
                    ComputeManagementClient,
                    StorageManagementClient,
                )
            )
        )
        vm, _ = make_vm(az)
        account = az.storage.storage_accounts.begin_create(
            "rg1", "kilnstaging", {"location": LOC, "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"}
        ).result()
        assert account.primary_endpoints.blob == azurite.blob_url + "/"
        key = az.storage.storage_accounts.list_keys("rg1", "kilnstaging").as_dict()["keys"][0]["value"]
        assert key == azurite.account_key

        az.compute.virtual_machines.begin_deallocate("rg1", "vm1").result()
        sas = (
            az.compute.disks.begin_grant_access(
                "rg1", vm.storage_profile.os_disk.name, {"access": "Read", "durationInSeconds": 600}
            )
            .result()
            .access_sas
        )
        assert sas.startswith(azurite.blob_url) and "sig=" in sas
        blob = BlobClient.from_blob_url(sas)
        assert blob.get_blob_properties().blob_type == "PageBlob"
        vhd = blob.download_blob().readall()
        assert vhd[-512:-504] == b"conectix" and len(vhd) % 512 == 0


def test_revoking_an_export_fails_the_copies_still_reading_it(emulator_azurite: Azurite) -> None:
    """endGetAccess revokes every SAS of the disk: a server-side blob copy still reading from one fails, and the
    SAS itself no longer reads; a copy that had finished keeps its blob."""
    azurite = emulator_azurite
    with ArmEmulator(azurite=azurite, proxy_storage=True) as arm:
        kwargs = client_kwargs(arm.base_url)
        az = Clients(
            *(
                cls(FakeCredential(), SUB, **kwargs)
                for cls in (
                    ResourceManagementClient,
                    NetworkManagementClient,
                    ComputeManagementClient,
                    StorageManagementClient,
                )
            )
        )
        vm, _ = make_vm(az)
        endpoint = (
            az.storage.storage_accounts.begin_create(
                "rg1", "kilnout", {"location": LOC, "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"}
            )
            .result()
            .primary_endpoints.blob
        )
        container = f"vhds-{uuid.uuid4().hex[:8]}"
        BlobServiceClient(endpoint, credential=azurite.account_key).create_container(container)
        az.compute.virtual_machines.begin_deallocate("rg1", "vm1").result()
        disk = vm.storage_profile.os_disk.name
        grant = {"access": "Read", "durationInSeconds": 600}
        sas = az.compute.disks.begin_grant_access("rg1", disk, grant).result().access_sas

        def copy_to(name: str) -> BlobClient:
            blob = BlobClient(endpoint, container, name, credential=azurite.account_key)
            blob.start_copy_from_url(sas)
            return blob

        finished = copy_to("finished.vhd")
        assert finished.get_blob_properties().copy.status == "success"
        release = arm.blob_proxy.hold_copies(r"/pending\.vhd$")
        pending = copy_to("pending.vhd")
        assert pending.get_blob_properties().copy.status == "pending"
        az.compute.disks.begin_revoke_access("rg1", disk).result()
        release()
        failed = pending.get_blob_properties().copy
        assert failed.status == "failed" and "CannotVerifyCopySource" in failed.status_description
        assert finished.get_blob_properties().copy.status == "success"
        with pytest.raises(ResourceNotFoundError):
            BlobClient.from_blob_url(sas).get_blob_properties()
        # A new grant exports the disk again.
        sas = az.compute.disks.begin_grant_access("rg1", disk, grant).result().access_sas
        assert copy_to("again.vhd").get_blob_properties().copy.status == "success"


def test_fixed_vhd_footer_is_valid() -> None:
    from tests.arm_emulator import fixed_vhd

    footer = fixed_vhd()[-512:]
    checksum = int.from_bytes(footer[64:68], "big")
    assert checksum == ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF
    assert int.from_bytes(footer[48:56], "big") == 1024 * 1024  # current size
    assert int.from_bytes(footer[60:64], "big") == 2  # fixed disk
