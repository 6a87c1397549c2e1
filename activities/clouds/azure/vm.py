"""Build VMs on Azure: their network, the VM itself, its pinned host key, its capture, and their deletion."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from activities.clouds.aib.ids import parse_platform_image_id
from activities.clouds.aib.vm_sizes import vm_size_for
from activities.clouds.azure.clients import ArmClients
from activities.clouds.azure.errors import IN_USE_CODES, arm_call, error_code, permanent
from activities.clouds.azure.names import VmParts, computer_name

SSH_PORT = 22
WINRM_HTTPS_PORT = 5986
# Azure keeps a NIC for the VM it was made for 180 s after that VM is gone (NicReservedForAnotherVm): deletes and
# creates that meet a conflict wait that long and a margin before the activity's retry policy takes over.
IN_USE_WAIT = 240.0
MOST_CONFLICT_BACKOFF = 15.0
VIRTUAL_MACHINES = "Microsoft.Compute/virtualMachines"
SUBNET = "build"
ADDRESS_SPACE = "10.0.0.0/24"
# The guest agent's run command reports "Enable succeeded: \n[stdout]\n<out>\n[stderr]\n<err>".
_STDOUT = re.compile(r"\[stdout\]\n(?P<out>.*?)(?:\n\[stderr\]|$)", re.DOTALL)

# Turns on WinRM over HTTPS with a self-signed certificate and prints its thumbprint, which pins it.
WINRM_SETUP = r"""
$cert = Get-ChildItem Cert:\LocalMachine\My | Where-Object { $_.FriendlyName -eq 'kiln-winrm' } | Select-Object -First 1
if (-not $cert) {
  $cert = New-SelfSignedCertificate -DnsName $env:COMPUTERNAME -CertStoreLocation Cert:\LocalMachine\My -FriendlyName 'kiln-winrm'
}
Get-ChildItem WSMan:\localhost\Listener | Where-Object { $_.Keys -contains 'Transport=HTTPS' } | Remove-Item -Recurse -Force
New-Item -Path WSMan:\localhost\Listener -Transport HTTPS -Address * -CertificateThumbPrint $cert.Thumbprint -Force | Out-Null
if (-not (Get-NetFirewallRule -Name kiln-winrm-https -ErrorAction SilentlyContinue)) {
  New-NetFirewallRule -Name kiln-winrm-https -DisplayName 'kiln WinRM HTTPS' -Protocol TCP -LocalPort 5986 -Action Allow | Out-Null
}
Write-Output $cert.Thumbprint
"""


def run_command_stdout(result: Any) -> str:
    """Stdout of a run command: Linux packs it into one status message, Windows gives it its own status."""
    statuses = list(result.value or []) if result is not None else []
    for status in statuses:
        if "StdOut" in (status.code or ""):
            return status.message or ""
    for status in statuses:
        found = _STDOUT.search(status.message or "")
        if found:
            return found.group("out")
    return ""


async def lro(begin: Awaitable[Any]) -> Any:
    """Start a long-running ARM operation and wait for its end (the SDK's poller does the polling)."""
    return await (await begin).result()


class AzureVms:
    def __init__(
        self,
        arm: ArmClients,
        *,
        egress_source: Callable[[], Awaitable[str]],
        guest_endpoint: Callable[[str, str, int], tuple[str, int]],
        conflict_backoff: float,
        in_use_wait: float = IN_USE_WAIT,
    ) -> None:
        self._arm = arm
        self._egress_source = egress_source
        self._guest_endpoint = guest_endpoint
        self._conflict_backoff = conflict_backoff
        self._in_use_wait = in_use_wait

    # ---- network

    async def create_network(
        self, group: str, parts: VmParts, *, location: str, tags: dict[str, str], subnet_id: str | None
    ) -> tuple[Any, list[tuple[str, str]]]:
        """The VM's NIC, and before it (without a subnet from the template) an NSG, a VNet and a public IP."""
        network = self._arm.network
        made: list[tuple[str, str]] = []
        ip_config: dict[str, Any] = {"privateIPAllocationMethod": "Dynamic", "primary": True}
        if subnet_id:
            ip_config["subnet"] = {"id": subnet_id}
        else:
            source = await self._egress_source()
            rules = [
                {
                    "name": name,
                    "properties": {
                        "protocol": "Tcp",
                        "access": "Allow",
                        "direction": "Inbound",
                        "priority": priority,
                        "sourceAddressPrefix": source,
                        "sourcePortRange": "*",
                        "destinationAddressPrefix": "*",
                        "destinationPortRange": str(port),
                    },
                }
                for name, port, priority in (("kiln-ssh", SSH_PORT, 100), ("kiln-winrm-https", WINRM_HTTPS_PORT, 110))
            ]
            async with arm_call(
                f"network security group {parts.nsg}", needs="Microsoft.Network/networkSecurityGroups/write"
            ):
                nsg = await lro(
                    network.network_security_groups.begin_create_or_update(
                        group, parts.nsg, {"location": location, "tags": tags, "properties": {"securityRules": rules}}
                    )
                )
            made.append((nsg.id, "networkSecurityGroup"))
            async with arm_call(f"virtual network {parts.vnet}", needs="Microsoft.Network/virtualNetworks/write"):
                vnet = await lro(
                    network.virtual_networks.begin_create_or_update(
                        group,
                        parts.vnet,
                        {
                            "location": location,
                            "tags": tags,
                            "properties": {
                                "addressSpace": {"addressPrefixes": [ADDRESS_SPACE]},
                                "subnets": [
                                    {
                                        "name": SUBNET,
                                        "properties": {
                                            "addressPrefix": ADDRESS_SPACE,
                                            "networkSecurityGroup": {"id": nsg.id},
                                        },
                                    }
                                ],
                            },
                        },
                    )
                )
            made.append((vnet.id, "virtualNetwork"))
            async with arm_call(
                f"public IP address {parts.public_ip}", needs="Microsoft.Network/publicIPAddresses/write"
            ):
                public_ip = await lro(
                    network.public_ip_addresses.begin_create_or_update(
                        group,
                        parts.public_ip,
                        {
                            "location": location,
                            "tags": tags,
                            "sku": {"name": "Standard"},
                            "properties": {"publicIPAllocationMethod": "Static"},
                        },
                    )
                )
            made.append((public_ip.id, "publicIPAddress"))
            ip_config["subnet"] = {"id": f"{vnet.id}/subnets/{SUBNET}"}
            ip_config["publicIPAddress"] = {"id": public_ip.id}
        async with arm_call(
            f"network interface {parts.nic}",
            needs="Microsoft.Network/networkInterfaces/write, Microsoft.Network/virtualNetworks/subnets/join/action",
        ):
            nic = await lro(
                network.network_interfaces.begin_create_or_update(
                    group,
                    parts.nic,
                    {
                        "location": location,
                        "tags": tags,
                        "properties": {"ipConfigurations": [{"name": "ipconfig1", "properties": ip_config}]},
                    },
                )
            )
        made.append((nic.id, "networkInterface"))
        return nic, made

    async def address_of(self, group: str, parts: VmParts, *, public: bool) -> str:
        """The address the worker reaches the VM at: its public IP, or its private one on the template's subnet."""
        if public:
            address = (await self._arm.network.public_ip_addresses.get(group, parts.public_ip)).ip_address
        else:
            nic = await self._arm.network.network_interfaces.get(group, parts.nic)
            address = nic.ip_configurations[0].private_ip_address if nic.ip_configurations else None
        if not address:
            raise RuntimeError(f"VM {parts.vm} has no IP address yet")
        return address

    def endpoint(self, vm_id: str, address: str, port: int) -> tuple[str, int]:
        return self._guest_endpoint(vm_id, address, port)

    # ---- host key / WinRM certificate

    async def read_host_key(self, group: str, vm_name: str) -> str:
        """The VM's SSH host key, read through the guest agent (run command), so the first SSH connection already
        checks it: nothing is trusted on first use."""
        async with arm_call(f"VM {vm_name}", needs="Microsoft.Compute/virtualMachines/runCommand/action"):
            result = await lro(
                self._arm.compute.virtual_machines.begin_run_command(
                    group,
                    vm_name,
                    {"commandId": "RunShellScript", "script": ["cat /etc/ssh/ssh_host_ed25519_key.pub"]},
                )
            )
        for line in run_command_stdout(result).splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "ssh-ed25519":
                return f"{fields[0]} {fields[1]}"
        # The guest may not have made its host keys yet: a retry of the step asks again.
        raise RuntimeError(f"VM {vm_name} reported no ed25519 SSH host key yet")

    async def enable_winrm(self, group: str, vm_name: str) -> str:
        """Turn on WinRM over HTTPS (port 5986, as AIB does) and return the listener certificate's thumbprint."""
        async with arm_call(f"VM {vm_name}", needs="Microsoft.Compute/virtualMachines/runCommand/action"):
            result = await lro(
                self._arm.compute.virtual_machines.begin_run_command(
                    group, vm_name, {"commandId": "RunPowerShellScript", "script": WINRM_SETUP.strip().splitlines()}
                )
            )
        thumbprint = run_command_stdout(result).strip().splitlines()[-1:] or [""]
        if not re.fullmatch(r"[0-9A-Fa-f]{40}", thumbprint[0]):
            raise RuntimeError(f"VM {vm_name} did not report a WinRM certificate thumbprint")
        return f"winrm-sha1:{thumbprint[0].upper()}"

    # ---- the VM

    async def create_vm(
        self,
        group: str,
        parts: VmParts,
        *,
        location: str,
        tags: dict[str, str],
        nic_id: str,
        image_reference: dict[str, Any],
        plan: dict[str, str] | None,
        os_type: str,
        generation: str,
        vm_size: str,
        os_disk_size_gb: int,
        data_disk_sizes_gb: list[int],
        security_type: str,
        identities: list[str],
        admin_user: str,
        ssh_public_key: str | None,
        password: str | None,
    ) -> Any:
        os_profile: dict[str, Any] = {"computerName": computer_name(parts.vm, os_type), "adminUsername": admin_user}
        if os_type == "Windows":
            os_profile["adminPassword"] = password
            os_profile["windowsConfiguration"] = {"provisionVMAgent": True, "enableAutomaticUpdates": False}
        else:
            os_profile["linuxConfiguration"] = {
                "disablePasswordAuthentication": True,
                "provisionVMAgent": True,
                "ssh": {
                    "publicKeys": [{"path": f"/home/{admin_user}/.ssh/authorized_keys", "keyData": ssh_public_key}]
                },
            }
        os_disk: dict[str, Any] = {
            "name": parts.os_disk,
            "createOption": "FromImage",
            "caching": "ReadWrite",
            # The disk and NIC go with the VM when it is deleted; the explicit deletes after it are then no-ops.
            "deleteOption": "Delete",
            "managedDisk": {"storageAccountType": "StandardSSD_LRS"},
        }
        if os_disk_size_gb:
            os_disk["diskSizeGB"] = os_disk_size_gb
        size = vm_size_for(vm_size, generation)
        body: dict[str, Any] = {
            "location": location,
            "tags": tags,
            "properties": {
                "hardwareProfile": {"vmSize": size},
                "storageProfile": {
                    "imageReference": image_reference,
                    "osDisk": os_disk,
                    "dataDisks": [
                        {
                            "lun": lun,
                            "name": parts.data_disk(lun),
                            "createOption": "Empty",
                            "diskSizeGB": size,
                            "deleteOption": "Delete",
                            "managedDisk": {"storageAccountType": "StandardSSD_LRS"},
                        }
                        for lun, size in enumerate(data_disk_sizes_gb)
                    ],
                },
                "osProfile": os_profile,
                "networkProfile": {
                    "networkInterfaces": [{"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}]
                },
                # Managed boot diagnostics: the serial log of a VM that never answers is the first thing to read.
                "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
            },
        }
        if generation == "V2" and security_type == "TrustedLaunch":
            body["properties"]["securityProfile"] = {
                "securityType": "TrustedLaunch",
                "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True},
            }
        elif generation == "V2":
            # Azure makes a Gen2 VM TrustedLaunch unless told otherwise (Trusted Launch as default), and no managed
            # image can be made from a TrustedLaunch VM (hashicorp/packer#13189): a build that needs one asks
            # for a Standard VM (aib.targets.build_security).
            body["properties"]["securityProfile"] = {"securityType": "Standard"}
        if plan:
            body["plan"] = plan
        if identities:
            body["identity"] = {"type": "UserAssigned", "userAssignedIdentities": {i: {} for i in identities}}
        await self._replace_failed(group, parts.vm)
        vms = self._arm.compute.virtual_machines
        # Made again under the same names, the VM is another VM to Azure, which holds the NIC for the failed one.
        return await self._while_in_use(
            lambda: self._create(vms, group, parts.vm, body, location=location, size=size),
            codes={"NicReservedForAnotherVm"},
        )

    @staticmethod
    async def _create(vms: Any, group: str, name: str, body: dict[str, Any], *, location: str, size: str) -> Any:
        async with arm_call(
            f"VM {name} ({size} in {location})",
            needs=f"the {size} family's vCPUs in {location} (and Microsoft.Compute/virtualMachines/write)",
        ):
            return await lro(vms.begin_create_or_update(group, name, body))

    async def _replace_failed(self, group: str, name: str) -> None:
        """Delete the VM an earlier try left Failed: sending its create again does not revive it."""
        vms = self._arm.compute.virtual_machines
        try:
            existing = await vms.get(group, name)
        except ResourceNotFoundError:
            return
        if existing.provisioning_state == "Failed":
            await self.delete(f"VM {name}", VIRTUAL_MACHINES, lambda: vms.begin_delete(group, name))

    async def _while_in_use(self, call: Callable[[], Awaitable[Any]], *, codes: set[str]) -> Any:
        """Run ``call``, again after a pause while it fails with one of ``codes`` (a conflict with a resource still
        in use, or still reserved), for up to ``in_use_wait`` seconds; the last failure is raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._in_use_wait
        pause = self._conflict_backoff
        while True:
            try:
                return await call()
            except HttpResponseError as err:
                if error_code(err) not in codes or loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, MOST_CONFLICT_BACKOFF)

    # ---- deletes

    async def delete(self, what: str, arm_type: str, begin: Callable[[], Awaitable[Any]]) -> None:
        """Delete one resource: done when it (or its group) is gone. A conflict with a resource still using it, or
        a NIC Azure still reserves for a VM that is gone, is retried here for up to ``in_use_wait`` seconds, and
        beyond that by the activity's retry policy."""

        async def once() -> None:
            try:
                result = await begin()
                if hasattr(result, "result"):
                    await result.result()
            except ResourceNotFoundError:
                return

        try:
            await self._while_in_use(once, codes=IN_USE_CODES)
        except HttpResponseError as err:
            # Still in use after the wait: left to the activity's retry policy, which tries again later.
            failure = None if error_code(err) in IN_USE_CODES else permanent(err, what=what, needs=f"{arm_type}/delete")
            if failure is not None:
                raise failure from err
            raise

    async def delete_vm_parts(self, group: str, parts: VmParts) -> None:
        """The VM and everything made for it, in dependency order: users before what they use."""
        compute, network = self._arm.compute, self._arm.network
        steps: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = [
            (
                f"VM {parts.vm}",
                "Microsoft.Compute/virtualMachines",
                lambda: compute.virtual_machines.begin_delete(group, parts.vm),
            ),
            (
                f"network interface {parts.nic}",
                "Microsoft.Network/networkInterfaces",
                lambda: network.network_interfaces.begin_delete(group, parts.nic),
            ),
            (
                f"public IP address {parts.public_ip}",
                "Microsoft.Network/publicIPAddresses",
                lambda: network.public_ip_addresses.begin_delete(group, parts.public_ip),
            ),
            # The subnet refers to the NSG, so the VNet goes first.
            (
                f"virtual network {parts.vnet}",
                "Microsoft.Network/virtualNetworks",
                lambda: network.virtual_networks.begin_delete(group, parts.vnet),
            ),
            (
                f"network security group {parts.nsg}",
                "Microsoft.Network/networkSecurityGroups",
                lambda: network.network_security_groups.begin_delete(group, parts.nsg),
            ),
            (
                f"disk {parts.os_disk}",
                "Microsoft.Compute/disks",
                lambda: compute.disks.begin_delete(group, parts.os_disk),
            ),
        ]
        for what, arm_type, begin in steps:
            await self.delete(what, arm_type, begin)


def image_reference(image_id: str) -> dict[str, Any]:
    """A VM's imageReference: marketplace coordinates for a platform image, the id for anything else."""
    platform = parse_platform_image_id(image_id)
    if platform is not None:
        return {
            "publisher": platform.publisher,
            "offer": platform.offer,
            "sku": platform.sku,
            "version": platform.version,
        }
    return {"id": image_id}
