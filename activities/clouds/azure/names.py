"""Every name and tag kiln gives an Azure resource, derived from the build alone.

A retried create, or another worker taking the build over, computes the same names and so finds what the first
attempt made; a delete computes them too and needs nothing from the create's result.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

from activities.clouds.base import PermanentError
from workflows.models import BuildContext

TAG_BUILD_ID = "kilnBuildId"
TAG_ROLE = "kilnRole"
ROLE_TEMPORARY = "temporary"
ROLE_OUTPUT = "output"
# The VM remembers its generation, so capture can carry it to the image without asking the caller.
TAG_GENERATION = "kilnHyperVGeneration"
CREATED_BY = "kiln"
STAGING_CONTAINER = "staging"
LOGS_CONTAINER = "packerlogs"
VHD_CONTAINER = "vhds"

_NAMESPACE = uuid.UUID("6b1d3c52-0f4e-4a8e-9c55-7f6f0f6c3a11")
_GROUP_ID = re.compile(r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/?$", re.IGNORECASE)
_RESOURCE_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<group>[^/]+)/providers/(?P<ns>[^/]+)/(?P<rest>.+)$",
    re.IGNORECASE,
)


def digest(build_id: str, length: int) -> str:
    return hashlib.sha256(build_id.encode()).hexdigest()[:length]


def build_guid(build_id: str) -> str:
    """The GUID AIB puts at the end of the staging group's name; here a stable function of the build id."""
    return str(uuid.uuid5(_NAMESPACE, build_id))


def staging_group_name(build: BuildContext) -> str:
    """``IT_<rg>_<template>_<guid>`` as AIB names it, the middle cut to keep within ARM's 90 characters."""
    guid = build_guid(build.build_id)
    middle = f"{build.destination_resource_group or 'kiln'}_{build.template_name}"
    middle = re.sub(r"[^-\w._()]", "-", middle)[: 90 - len("IT_") - 1 - len(guid)]
    return f"IT_{middle}_{guid}"


@dataclass(frozen=True)
class StagingGroup:
    subscription: str
    name: str
    user_given: bool

    @property
    def id(self) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.name}"


def staging_group(build: BuildContext, subscription: str) -> StagingGroup:
    """The build's staging group: the template's stagingResourceGroup, or one named as AIB names it."""
    if build.staging_resource_group:
        found = _GROUP_ID.match(build.staging_resource_group)
        if found is None:
            raise PermanentError(
                f"properties.stagingResourceGroup: '{build.staging_resource_group}' is not a resource group id "
                "(/subscriptions/<subscription>/resourceGroups/<name>)",
                kind="BadStagingResourceGroup",
            )
        if found.group(1).lower() != subscription.lower():
            raise PermanentError(
                f"properties.stagingResourceGroup: '{build.staging_resource_group}' is not in subscription "
                f"{subscription}, the one kiln builds in",
                kind="BadStagingResourceGroup",
            )
        return StagingGroup(subscription, found.group(2), user_given=True)
    return StagingGroup(subscription, staging_group_name(build), user_given=False)


def storage_account_name(build_id: str) -> str:
    """3-24 lowercase letters and digits, unique across Azure with overwhelming odds."""
    return f"kiln{digest(build_id, 20)}"


def admin_user(build_id: str) -> str:
    return f"kiln{digest('user/' + build_id, 8)}"


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


def snapshot_name(image_name: str) -> str:
    return f"{image_name}-osdisk"


def snapshot_copy_name(build_id: str, index: int) -> str:
    """The captured snapshot's copy in a distribution target's region: one per target, found again by a retry."""
    return f"{build_id}-out{index}-osdisk"


def region_key(location: str) -> str:
    """ARM takes "West US 2" and "westus2" for the same region."""
    return location.replace(" ", "").lower()


@dataclass(frozen=True)
class ResourceId:
    subscription: str
    group: str
    namespace: str
    # type/name pairs after the namespace: ["galleries", "g", "images", "i", "versions", "1.0.0"]
    path: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.path[-1]


def parse_id(resource_id: str, *, field: str) -> ResourceId:
    found = _RESOURCE_ID.match(resource_id)
    if found is None:
        raise PermanentError(f"{field}: '{resource_id}' is not an ARM resource id", kind="BadResourceId")
    path = tuple(found.group("rest").strip("/").split("/"))
    if len(path) % 2:
        raise PermanentError(f"{field}: '{resource_id}' is not an ARM resource id", kind="BadResourceId")
    return ResourceId(found.group("sub"), found.group("group"), found.group("ns"), path)


def base_tags(build: BuildContext, *, role: str) -> dict[str, str]:
    """What every resource kiln makes carries: the user's managedResourceTags, then AIB's and kiln's own."""
    return {
        **build.managed_resource_tags,
        "createdBy": CREATED_BY,
        "imageTemplateName": build.template_name,
        "imageTemplateResourceGroupName": build.destination_resource_group,
        TAG_BUILD_ID: build.build_id,
        TAG_ROLE: role,
    }
