"""Microsoft.Network: virtual networks and their subnets, network security groups, public IP addresses and network
interfaces.

A NIC reserved for a VM that is gone (see compute/vm.py) refuses deletion with 400 NicReservedForAnotherVm.

Every PUT answers 201 / 200 with Azure-AsyncOperation and provisioningState Updating; every resource carries a
weak etag. A VNet's inline subnets become child resources, as ARM stores them, and a resource still referenced
(an NSG by a subnet, a NIC by a VM) refuses deletion with 400. A NIC's private IP and a public IP are where the
guest of the VM using them listens, a loopback address (127.0.0.1 until a guest says otherwise).
"""

from __future__ import annotations

import copy
import uuid
from typing import TYPE_CHECKING, Any

from .compute.names import VIRTUAL_MACHINES
from .compute.vm import guest_host, nic_reserved, nic_reserved_for
from .crud import render
from .protocol import ArmError
from .provider import InUse, Provider, ResourceType
from .store import Resource

if TYPE_CHECKING:
    from .server import ArmEmulator

VIRTUAL_NETWORKS = "Microsoft.Network/virtualNetworks"
SUBNETS = "Microsoft.Network/virtualNetworks/subnets"
SECURITY_GROUPS = "Microsoft.Network/networkSecurityGroups"
PUBLIC_IPS = "Microsoft.Network/publicIPAddresses"
NICS = "Microsoft.Network/networkInterfaces"


def _ip_configs(arm: ArmEmulator) -> list[dict[str, Any]]:
    return [c for r in arm.store if r.type == NICS for c in r.properties.get("ipConfigurations") or []]


# ----------------------------------------------------------------- virtual networks and subnets


def _prepare_vnet(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    # Inline subnets become child resources, which is how ARM stores them.
    for sub in res.properties.pop("subnets", None) or []:
        props = copy.deepcopy(sub.get("properties") or {})
        arm.store.check_refs(props)
        props.setdefault("provisioningState", "Succeeded")
        arm.store.add(Resource(f"{res.id}/subnets/{sub['name']}", SUBNETS, {}, props))
    guid = existing.properties["resourceGuid"] if existing else str(uuid.uuid4())
    res.properties.setdefault("resourceGuid", guid)


def _render_vnet(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    props["subnets"] = [render(arm, s) for s in arm.store if s.key.startswith(res.key + "/subnets/")]


def _prepare_subnet(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    arm.store.check_refs(res.properties)


def _render_subnet(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    props["ipConfigurations"] = [
        {"id": c["id"]}
        for c in _ip_configs(arm)
        if (c["properties"].get("subnet") or {}).get("id", "").lower() == res.key
    ]


# ----------------------------------------------------------------- network security groups


def _prepare_nsg(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    for rule in res.properties.get("securityRules") or []:
        rule["id"] = f"{res.id}/securityRules/{rule.get('name')}"
    res.properties["defaultSecurityRules"] = [
        {
            "id": f"{res.id}/defaultSecurityRules/{name}",
            "name": name,
            "properties": {
                "protocol": "*",
                "access": access,
                "direction": direction,
                "priority": priority,
                "sourceAddressPrefix": src,
                "sourcePortRange": "*",
                "destinationAddressPrefix": "*",
                "destinationPortRange": "*",
            },
        }
        for name, access, direction, priority, src in (
            ("AllowVnetInBound", "Allow", "Inbound", 65000, "VirtualNetwork"),
            ("DenyAllInBound", "Deny", "Inbound", 65500, "*"),
            ("AllowInternetOutBound", "Allow", "Outbound", 65001, "*"),
        )
    ]


def _render_nsg(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    for field_name, wanted in (("subnets", SUBNETS), ("networkInterfaces", NICS)):
        users = [
            o.id
            for o in arm.store
            if o.type == wanted and (o.properties.get("networkSecurityGroup") or {}).get("id", "").lower() == res.key
        ]
        if users:
            props[field_name] = [{"id": u} for u in users]


# ----------------------------------------------------------------- public IP addresses


def _prepare_public_ip(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    res.envelope.setdefault("sku", {"name": "Standard", "tier": "Regional"})
    res.properties.setdefault("publicIPAllocationMethod", "Static")
    res.properties.setdefault("publicIPAddressVersion", "IPv4")


def _render_public_ip(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    config = next(
        (
            c
            for c in _ip_configs(arm)
            if (c["properties"].get("publicIPAddress") or {}).get("id", "").lower() == res.key
        ),
        None,
    )
    if config is not None:
        props["ipConfiguration"] = {"id": config["id"]}
        nic = arm.store.find(config["id"].lower().rsplit("/ipconfigurations/", 1)[0])
        props["ipAddress"] = guest_host(arm.store.referrer(nic, VIRTUAL_MACHINES) if nic else None)
    else:
        props["ipAddress"] = "127.0.0.1"


# ----------------------------------------------------------------- network interfaces


def _prepare_nic(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    arm.store.check_refs(res.properties)
    configs = res.properties.get("ipConfigurations") or []
    if not configs:
        raise ArmError(400, "InvalidRequestFormat", "A network interface needs at least one ipConfiguration.")
    for i, config in enumerate(configs):
        config["id"] = f"{res.id}/ipConfigurations/{config.get('name')}"
        props = config.setdefault("properties", {})
        props.setdefault("privateIPAllocationMethod", "Dynamic")
        props.setdefault("primary", i == 0)
    res.properties.setdefault(
        "macAddress",
        existing.properties.get("macAddress")
        if existing
        else "00-0D-3A-" + "-".join(f"{b:02X}" for b in uuid.uuid4().bytes[:3]),
    )


def _check_nic_delete(arm: ArmEmulator, res: Resource) -> None:
    reserved = nic_reserved_for(res)
    if reserved is not None:
        raise nic_reserved(arm, reserved[0])


def _render_nic(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    vm = arm.store.referrer(res, VIRTUAL_MACHINES)
    host = guest_host(vm)
    if vm is not None:
        props["virtualMachine"] = {"id": vm.id}
    for config in props.get("ipConfigurations") or []:
        config["properties"]["privateIPAddress"] = host
        config["properties"]["provisioningState"] = props["provisioningState"]


_SUBNET_IN_USE = InUse(400, "InUseSubnetCannotBeDeleted", (NICS,))

PROVIDER = Provider(
    types=(
        ResourceType(
            VIRTUAL_NETWORKS,
            "aao201",
            creating="Updating",
            etag=True,
            prepare=_prepare_vnet,
            render=_render_vnet,
            in_use=_SUBNET_IN_USE,
        ),
        ResourceType(
            SUBNETS,
            "aao201",
            tracked=False,
            creating="Updating",
            etag=True,
            prepare=_prepare_subnet,
            render=_render_subnet,
            in_use=_SUBNET_IN_USE,
        ),
        ResourceType(
            SECURITY_GROUPS,
            "aao201",
            creating="Updating",
            etag=True,
            prepare=_prepare_nsg,
            render=_render_nsg,
            in_use=InUse(400, "InUseNetworkSecurityGroupCannotBeDeleted", (NICS, SUBNETS)),
        ),
        ResourceType(
            PUBLIC_IPS,
            "aao201",
            creating="Updating",
            etag=True,
            prepare=_prepare_public_ip,
            render=_render_public_ip,
            in_use=InUse(400, "PublicIPAddressCannotBeDeleted", (NICS,)),
        ),
        ResourceType(
            NICS,
            "aao201",
            creating="Updating",
            etag=True,
            prepare=_prepare_nic,
            render=_render_nic,
            in_use=InUse(400, "NicInUse", (VIRTUAL_MACHINES,)),
            check_delete=_check_nic_delete,
        ),
    ),
)
