"""The names AIB gives what it makes for a build, derived here from the build id alone.

AIB names the staging group ``IT_<destination resource group>_<template>_<GUID>`` unless the template gives one
(``stagingResourceGroup``, a resource group id in the template's subscription), and gives the build VM an admin
user of its own. kiln derives the GUID and the user from the build id, and names a staged artifact by its field
and its content, so a retried create, or another worker taking the build over, finds what the first attempt made.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

from activities.clouds.aib.ids import parse_resource_group_id, resource_group_id
from activities.clouds.base import PermanentError
from workflows.models import Artifact, BuildContext

# ARM's limit on a resource group's name.
MAX_GROUP_NAME = 90

_NAMESPACE = uuid.UUID("6b1d3c52-0f4e-4a8e-9c55-7f6f0f6c3a11")


def digest(text: str, length: int) -> str:
    """``length`` hex digits that stand for ``text``: names fit their limits whatever the build id is."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def build_guid(build_id: str) -> str:
    """The GUID AIB puts at the end of the staging group's name; here a stable function of the build id."""
    return str(uuid.uuid5(_NAMESPACE, build_id))


def staging_group_name(build: BuildContext) -> str:
    """``IT_<rg>_<template>_<guid>`` as AIB names it, the middle cut to keep within ARM's 90 characters."""
    guid = build_guid(build.build_id)
    middle = f"{build.destination_resource_group or 'kiln'}_{build.template_name}"
    middle = re.sub(r"[^-\w._()]", "-", middle)[: MAX_GROUP_NAME - len("IT_") - 1 - len(guid)]
    return f"IT_{middle}_{guid}"


@dataclass(frozen=True)
class StagingGroup:
    """The resource group a build stages in; ``user_given`` when the template named it (kiln never deletes it)."""

    subscription: str
    name: str
    user_given: bool

    @property
    def id(self) -> str:
        return resource_group_id(self.subscription, self.name)


def staging_group(build: BuildContext, *, subscription: str, any_subscription: bool = False) -> StagingGroup:
    """The build's staging group: the template's stagingResourceGroup, or one named as AIB names it.

    Args:
        build: the build; its ``staging_resource_group`` is the template's, if any.
        subscription: where the cloud builds. AIB's own group is made there, and a given one must be in it.
        any_subscription: a given group may name any subscription (the local cloud's are only names).

    Raises:
        PermanentError: ``BadStagingResourceGroup`` when the given id is not a resource group id, or names
            another subscription.
    """
    given = build.staging_resource_group
    if not given:
        return StagingGroup(subscription, staging_group_name(build), user_given=False)
    parsed = parse_resource_group_id(given)
    if parsed is None:
        raise PermanentError(
            f"properties.stagingResourceGroup: '{given}' is not a resource group id "
            "(/subscriptions/<subscription>/resourceGroups/<name>)",
            kind="BadStagingResourceGroup",
        )
    if not any_subscription and parsed[0].lower() != subscription.lower():
        raise PermanentError(
            f"properties.stagingResourceGroup: '{given}' is not in subscription {subscription}, the one kiln builds in",
            kind="BadStagingResourceGroup",
        )
    return StagingGroup(parsed[0], parsed[1], user_given=True)


def staged_blob_name(artifact: Artifact, data: bytes) -> str:
    """A staged artifact's blob: the template field it came from and its content, so a retry writes the same one."""
    field = re.sub(r"[^A-Za-z0-9._-]+", "-", artifact.field).strip("-")
    return f"{field}-{hashlib.sha256(data).hexdigest()[:12]}"


def admin_user_of(build_id: str) -> str:
    """The build VM's admin user: AIB makes a random one; this one is derived, so a retried create finds it."""
    return f"kiln{digest('user/' + build_id, 8)}"
