"""ImageTemplate, the whole resource body (location, tags, identity, properties and the ARM envelope real
templates carry), and what a build reads off a parsed one: whether its VM runs Windows, and the resource
group AIB names the staging group after.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field
from pydantic_core import InitErrorDetails

from workflows.template.base import AibModel, broken_rule, input_field
from workflows.template.distribute import ManagedImageDistributor, SharedImageDistributor
from workflows.template.formats import ApiVersion, NonEmpty, ResourceName
from workflows.template.properties import TemplateProperties
from workflows.template.source import PlatformImageSource
from workflows.template.steps import PowerShellCustomizer, WindowsRestartCustomizer, WindowsUpdateCustomizer


class UserAssignedIdentity(AibModel):
    """Values are `{}` in requests; AIB fills the read-only ids in responses."""

    principal_id: str | None = None
    client_id: str | None = None


class TemplateIdentity(AibModel):
    """The identity AIB acts as (reading scripts, writing images); AIB supports a single one."""

    type: Literal["UserAssigned", "None"]
    user_assigned_identities: dict[str, UserAssignedIdentity] = {}

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        identities = input_field(data, "userAssignedIdentities")
        if isinstance(identities, dict) and len(identities) > 1:
            yield broken_rule(
                f"Only one user-assigned identity is supported; {len(identities)} are given.",
                data,
                "userAssignedIdentities",
            )


class ImageTemplate(AibModel):
    """An AIB image template: the resource body PUT to Microsoft.VirtualMachineImages/imageTemplates.

    `identity` is optional although AIB requires it since 2020-02-14: local builds need none, and older
    templates omit it (for a build on Azure, `check_template` warns of it).
    """

    location: NonEmpty = Field(description="Azure region of the template (and of the build).")
    tags: dict[str, str] = {}
    identity: TemplateIdentity | None = None
    properties: TemplateProperties
    # The ARM envelope, as templates written as ARM resources carry it.
    type: str | None = Field(None, description="Microsoft.VirtualMachineImages/imageTemplates; any value accepted.")
    api_version: ApiVersion | None = Field(None, description="ARM envelope; AIB recommends leaving it out of the body.")
    name: ResourceName | None = Field(None, description="Template name, when the body carries it.")
    id: str | None = None
    depends_on: list[str] = []
    comments: str | None = None
    system_data: dict[str, Any] | None = None


_WINDOWS_PUBLISHERS = {"microsoftwindowsserver", "microsoftwindowsdesktop"}


def is_windows_source(template: ImageTemplate) -> bool:
    """Whether the build VM runs Windows: a Windows marketplace publisher, or any Windows-only step."""
    source = template.properties.source
    if isinstance(source, PlatformImageSource) and source.publisher.lower() in _WINDOWS_PUBLISHERS:
        return True
    validation = template.properties.validation
    steps = [*template.properties.customize, *(validation.in_vm_validations if validation else [])]
    return any(isinstance(s, PowerShellCustomizer | WindowsRestartCustomizer | WindowsUpdateCustomizer) for s in steps)


_RESOURCE_GROUP = re.compile(r"/resourceGroups/([^/]+)", re.IGNORECASE)


def destination_resource_group(template: ImageTemplate) -> str:
    """The resource group of the first distribution target with a resource id ("" if none).

    AIB names its staging group after it: `IT_<group>_<template>_<guid>`.
    """
    for target in template.properties.distribute:
        if isinstance(target, ManagedImageDistributor):
            found = _RESOURCE_GROUP.search(target.image_id)
        elif isinstance(target, SharedImageDistributor):
            found = _RESOURCE_GROUP.search(target.gallery_image_id)
        else:
            continue
        if found:
            return found.group(1)
    return ""
