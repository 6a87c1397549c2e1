"""What a staging group holds, found without trusting ARM's generic resource listing.

ARM serves ``/resources`` (and a group's ``/resources``) from a regional cache: a resource made a moment ago appears
late and one deleted a moment ago lingers (azure-rest-api-specs#21221, #28600; azure-sdk-for-python#22737), and a
listing filtered by tag returns no tags. The listing of each resource type is served by its resource provider and
is current, so kiln finds its own resources, and judges whether a staging group is empty, by the listings of the
types it makes; the generic listing is read only for types kiln never makes (a user's resources in the group).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from activities.clouds.aib.tags import ROLE_LOG, ROLE_OUTPUT, ROLE_TEMPORARY, TAG_BUILD_ID, TAG_ROLE
from activities.clouds.azure.clients import ArmClients
from activities.clouds.azure.names import VmParts
from activities.clouds.azure.vm import AzureVms


@dataclass(frozen=True)
class _Kind:
    """One resource type kiln makes in a staging group: how to list it there and how to delete one."""

    arm_type: str
    listing: Callable[[ArmClients, str], AsyncIterator[Any]]
    delete: Callable[[ArmClients, str, str], Awaitable[Any]]


# In deletion order: users before what they use (the subnet refers to the NSG, so the VNet goes first).
_KINDS = (
    _Kind(
        "Microsoft.Compute/virtualMachines",
        lambda arm, g: arm.compute.virtual_machines.list(g),
        lambda arm, g, n: arm.compute.virtual_machines.begin_delete(g, n),
    ),
    _Kind(
        "Microsoft.Network/networkInterfaces",
        lambda arm, g: arm.network.network_interfaces.list(g),
        lambda arm, g, n: arm.network.network_interfaces.begin_delete(g, n),
    ),
    _Kind(
        "Microsoft.Network/publicIPAddresses",
        lambda arm, g: arm.network.public_ip_addresses.list(g),
        lambda arm, g, n: arm.network.public_ip_addresses.begin_delete(g, n),
    ),
    _Kind(
        "Microsoft.Network/virtualNetworks",
        lambda arm, g: arm.network.virtual_networks.list(g),
        lambda arm, g, n: arm.network.virtual_networks.begin_delete(g, n),
    ),
    _Kind(
        "Microsoft.Network/networkSecurityGroups",
        lambda arm, g: arm.network.network_security_groups.list(g),
        lambda arm, g, n: arm.network.network_security_groups.begin_delete(g, n),
    ),
    _Kind(
        "Microsoft.Compute/disks",
        lambda arm, g: arm.compute.disks.list_by_resource_group(g),
        lambda arm, g, n: arm.compute.disks.begin_delete(g, n),
    ),
    _Kind(
        "Microsoft.Compute/images",
        lambda arm, g: arm.compute.images.list_by_resource_group(g),
        lambda arm, g, n: arm.compute.images.begin_delete(g, n),
    ),
    _Kind(
        "Microsoft.Compute/snapshots",
        lambda arm, g: arm.compute.snapshots.list_by_resource_group(g),
        lambda arm, g, n: arm.compute.snapshots.begin_delete(g, n),
    ),
    _Kind(
        "Microsoft.Storage/storageAccounts",
        lambda arm, g: arm.storage.storage_accounts.list_by_resource_group(g),
        lambda arm, g, n: arm.storage.storage_accounts.delete(g, n),
    ),
)
_STORAGE = "Microsoft.Storage/storageAccounts"
_KNOWN = {kind.arm_type.lower() for kind in _KINDS}


def _of_build(resource: Any, build_id: str) -> bool:
    return (resource.tags or {}).get(TAG_BUILD_ID) == build_id


def _kept(resource: Any) -> bool:
    """An output or a log: the user's, and never a leftover."""
    return (resource.tags or {}).get(TAG_ROLE, ROLE_TEMPORARY) in (ROLE_OUTPUT, ROLE_LOG)


class Inventory:
    """The resources of a staging group, by the listings of each type kiln makes there."""

    def __init__(self, arm: ArmClients, vms: AzureVms) -> None:
        self._arm = arm
        self._vms = vms

    async def _listed(self, group: str) -> list[tuple[_Kind, list[Any]]]:
        """Each kind with its resources in ``group``; nothing when the group is gone."""

        async def one(kind: _Kind) -> list[Any]:
            try:
                return [r async for r in kind.listing(self._arm, group)]
            except ResourceNotFoundError:
                return []

        found = await asyncio.gather(*(one(kind) for kind in _KINDS))
        return list(zip(_KINDS, found, strict=True))

    async def of_build(self, group: str, build_id: str) -> list[Any]:
        """Every resource in ``group`` that build ``build_id`` made (it carries the build's id)."""
        return [r for _, listed in await self._listed(group) for r in listed if _of_build(r, build_id)]

    async def others(self, group: str, build_id: str) -> list[str]:
        """The ids of the resources in ``group`` that are not build ``build_id``'s: of the types kiln makes from
        their own listings, of any other type from the generic listing (the only one that has them all)."""
        mine = [r.id for _, listed in await self._listed(group) for r in listed if not _of_build(r, build_id)]
        rest = [
            r.id
            async for r in self._arm.resource.resources.list_by_resource_group(group)
            if r.type.lower() not in _KNOWN
        ]
        return mine + rest

    async def delete_build(self, group: str, build_id: str, *, keep_storage: bool) -> list[str]:
        """Delete what build ``build_id`` left in ``group`` (a half-made create whose undo was lost): each VM with
        everything made for it first, then the rest in dependency order; its storage account unless kept. An
        output or a log is never deleted here.

        Returns:
            The ids of what was there to delete.
        """
        listed = await self._listed(group)
        deleted: list[str] = []
        for kind, resources in listed:
            for res in resources:
                if not _of_build(res, build_id) or _kept(res) or (keep_storage and kind.arm_type == _STORAGE):
                    continue
                deleted.append(res.id)
                if kind.arm_type == "Microsoft.Compute/virtualMachines":
                    await self._vms.delete_vm_parts(group, VmParts(res.name))
                else:
                    await self._vms.delete(
                        f"{kind.arm_type.split('/')[-1]} {res.name}",
                        kind.arm_type,
                        lambda kind=kind, name=res.name: kind.delete(self._arm, group, name),
                    )
        return deleted
