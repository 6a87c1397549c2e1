"""The names kiln gives Azure resources of its own (storage account, VM parts, snapshots), from the build alone.

AIB's own names (the staging group, the admin user) are ``activities.clouds.aib.names``'. A retried create, or
another worker taking the build over, computes the same names and so finds what the first attempt made; a delete
computes them too and needs nothing from the create's result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from activities.clouds.aib.names import digest

# The VM remembers its generation, so capture can carry it to the image without asking the caller.
TAG_GENERATION = "kilnHyperVGeneration"
STAGING_CONTAINER = "staging"
LOGS_CONTAINER = "packerlogs"
VHD_CONTAINER = "vhds"


def storage_account_name(build_id: str) -> str:
    """3-24 lowercase letters and digits, unique across Azure with overwhelming odds."""
    return f"kiln{digest(build_id, 20)}"


def computer_name(vm_name: str, os_type: str) -> str:
    """Windows computer names have 15 characters at most; Linux host names are kept readable."""
    if os_type == "Windows":
        return f"kiln{digest(vm_name, 11)}"
    return re.sub(r"[^a-z0-9-]", "-", vm_name.lower())[:63]


@dataclass(frozen=True)
class VmParts:
    """The names of one VM and of everything made for it, all in the staging group."""

    vm: str

    @property
    def nic(self) -> str:
        return f"{self.vm}-nic"

    @property
    def public_ip(self) -> str:
        return f"{self.vm}-pip"

    @property
    def nsg(self) -> str:
        return f"{self.vm}-nsg"

    @property
    def vnet(self) -> str:
        return f"{self.vm}-vnet"

    @property
    def os_disk(self) -> str:
        return f"{self.vm}-osdisk"

    def data_disk(self, lun: int) -> str:
        return f"{self.vm}-data{lun}"


def snapshot_name(image_name: str) -> str:
    return f"{image_name}-osdisk"


def data_snapshot_name(image_name: str, lun: int) -> str:
    return f"{image_name}-data{lun}"


def snapshot_copy_name(build_id: str, index: int) -> str:
    """The captured snapshot's copy in a distribution target's region: one per target, found again by a retry."""
    return f"{build_id}-out{index}-osdisk"
