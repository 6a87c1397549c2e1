"""`properties` of an image template: its parts (source, steps, distribution targets) put together with the
build VM's profile, error handling, optimization, the build timeout and the read-only fields AIB returns.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import Field
from pydantic_core import InitErrorDetails

from workflows.template.api_versions import Since
from workflows.template.base import AibModel, broken_rule, given, input_field
from workflows.template.distribute import Distributor
from workflows.template.formats import SUBNET_ID, BuildTimeoutMinutes, ResourceGroupId, Sha256, SubnetId
from workflows.template.source import Source
from workflows.template.steps import Customizer, Validation


class VnetConfig(AibModel):
    """Puts the build VM on an existing subnet (with a proxy VM, or with an ACI subnet for isolated builds)."""

    subnet_id: SubnetId | None = None
    container_instance_subnet_id: Annotated[SubnetId | None, Since("2024-02-01")] = Field(
        None, description="Subnet for the build container; needs subnetId, in the same virtual network."
    )
    proxy_vm_size: Annotated[str, Since("2021-10-01")] = Field(
        "", description="Proxy VM size; not with containerInstanceSubnetId."
    )

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        subnet, aci = input_field(data, "subnetId"), input_field(data, "containerInstanceSubnetId")
        if given(aci):
            if not given(subnet):
                yield broken_rule(
                    "'containerInstanceSubnetId' can be given only together with 'subnetId'.",
                    data,
                    "containerInstanceSubnetId",
                )
            elif all(isinstance(i, str) and re.fullmatch(SUBNET_ID, i, re.IGNORECASE) for i in (aci, subnet)):
                if aci.lower() == subnet.lower():
                    yield broken_rule(
                        "'containerInstanceSubnetId' must be a different subnet from 'subnetId'.",
                        data,
                        "containerInstanceSubnetId",
                    )
                elif aci.lower().rpartition("/subnets/")[0] != subnet.lower().rpartition("/subnets/")[0]:
                    yield broken_rule(
                        "'containerInstanceSubnetId' must be in the same virtual network as 'subnetId'.",
                        data,
                        "containerInstanceSubnetId",
                    )
            if given(input_field(data, "proxyVmSize")):
                yield broken_rule(
                    "'proxyVmSize' must not be given with 'containerInstanceSubnetId': no proxy VM is deployed then.",
                    data,
                    "proxyVmSize",
                )


class VmProfile(AibModel):
    """The build (and validation) VM: size, OS disk size, identities and network."""

    vm_size: str = Field("", description="Build VM size; empty means Standard_D1_v2 (Gen1) or Standard_D2ds_v4 (Gen2).")
    os_disk_size_gb: int = Field(0, ge=0, alias="osDiskSizeGB", description="OS disk size; 0 keeps the source's.")
    user_assigned_identities: Annotated[list[str], Since("2021-10-01")] = Field(
        [], description="Managed identities attached to the build VM."
    )
    vnet_config: VnetConfig | None = None


class ErrorHandling(AibModel):
    """On a failed step: `cleanup` (the default) deletes the build VM, `abort` keeps it for debugging."""

    on_customizer_error: Literal["cleanup", "abort"] = "cleanup"
    on_validation_error: Literal["cleanup", "abort"] = "cleanup"


class VmBoot(AibModel):
    """Optimizes the captured image for a faster first boot."""

    state: Literal["Enabled", "Disabled"] = "Disabled"


class OptimizeWorkload(AibModel):
    """Optimizes the image for a workload with a script."""

    state: Literal["Enabled", "Disabled"] = "Disabled"
    script_uri: str | None = Field(None, description="The workload script; needed when state is Enabled.")
    sha256_checksum: Sha256 = ""

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        if input_field(data, "state") == "Enabled" and not given(input_field(data, "scriptUri")):
            yield broken_rule("'scriptUri' is needed when 'state' is Enabled.", data, "scriptUri")


class Optimize(AibModel):
    """Optimizations applied to the image once it is customized."""

    vm_boot: VmBoot | None = Field(None, description="Optimize the captured image for faster VM boot.")
    workload: Annotated[OptimizeWorkload | None, Since("2025-10-01")] = None

    @property
    def vm_boot_enabled(self) -> bool:
        """Whether the image is optimized for boot (vmBoot Enabled)."""
        return self.vm_boot is not None and self.vm_boot.state == "Enabled"


class AutoRun(AibModel):
    """Whether the template builds by itself when it is created."""

    state: Literal["Enabled", "Disabled"] = Field(
        "Disabled", description="Enabled: build once when the template is created."
    )


class DataDisk(AibModel):
    """A data disk added to the build VM and captured with the image."""

    size_gb: int | None = Field(None, ge=0, alias="sizeGB")


class ProvisioningError(AibModel):
    """Read-only in AIB; accepted and ignored."""

    provisioning_error_code: str | None = None
    message: str | None = None


class LastRunStatus(AibModel):
    """Read-only in AIB (the status of its last run); accepted and ignored."""

    start_time: str | None = None
    end_time: str | None = None
    run_state: str | None = None
    run_sub_state: str | None = None
    message: str | None = None


# VM boot optimization takes images up to 2 TB (learn.microsoft.com, vm-boot-optimization).
VM_BOOT_MAX_GB = 2048


def _vm_boot_rules(data: dict) -> Iterator[InitErrorDetails]:
    vm_boot = input_field(input_field(data, "optimize"), "vmBoot")
    size = input_field(input_field(data, "vmProfile"), "osDiskSizeGB")
    if input_field(vm_boot, "state") == "Enabled" and isinstance(size, int) and size > VM_BOOT_MAX_GB:
        yield broken_rule(
            f"VM boot optimization takes images of up to {VM_BOOT_MAX_GB} GB; vmProfile.osDiskSizeGB is {size}.",
            data,
            "optimize",
            "vmBoot",
            "state",
        )


class TemplateProperties(AibModel):
    """What to build: source, customization steps, validation, distribution targets and build VM."""

    source: Source = Field(description="The image to start from.")
    customize: list[Customizer] = Field([], description="Customization steps, run in order.")
    validation: Annotated[Validation | None, Since("2022-02-14")] = Field(
        default=None, alias="validate", description="Validation of the built image."
    )
    distribute: list[Distributor] = Field(
        min_length=1, description="Where the image goes; each target has its own runOutputName."
    )
    vm_profile: VmProfile = VmProfile()
    staging_resource_group: Annotated[ResourceGroupId | None, Since("2022-02-14")] = Field(
        None, description="Resource group id for the build's temporary resources; empty makes one per build."
    )
    error_handling: Annotated[ErrorHandling, Since("2023-07-01")] = ErrorHandling()
    optimize: Annotated[Optimize | None, Since("2022-07-01")] = None
    build_timeout_in_minutes: BuildTimeoutMinutes = Field(
        0, ge=0, le=960, description="Whole-build timeout, distribution included: 0 (4 hours) or 6 to 960 minutes."
    )
    auto_run: Annotated[AutoRun | None, Since("2024-02-01")] = None
    managed_resource_tags: Annotated[dict[str, str], Since("2024-02-01")] = Field(
        {}, description="Tags for the resources a build creates."
    )
    additional_data_disks: Annotated[list[DataDisk], Since("2025-10-01")] = Field(
        [], description="Data disks added to the build VM and captured with the image."
    )
    provisioning_state: Literal["Creating", "Updating", "Succeeded", "Failed", "Deleting", "Canceled"] | None = Field(
        None, description="Read-only in AIB; accepted and ignored."
    )
    provisioning_error: ProvisioningError | None = None
    last_run_status: LastRunStatus | None = None
    exact_staging_resource_group: str | None = Field(None, description="Read-only in AIB; accepted and ignored.")

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        yield from _vm_boot_rules(data)
        targets = input_field(data, "distribute")
        first: dict[str, int] = {}
        for index, target in enumerate(targets if isinstance(targets, list) else []):
            name = input_field(target, "runOutputName")
            if not isinstance(name, str):
                continue
            if name in first:
                yield broken_rule(
                    f"runOutputName '{name}' is already used by distribute[{first[name]}]; "
                    "each distribution target needs its own.",
                    data,
                    "distribute",
                    index,
                    "runOutputName",
                )
            else:
                first[name] = index

    @property
    def build_timeout(self) -> timedelta:
        """buildTimeoutInMinutes, where 0 means AIB's default of 4 hours."""
        return timedelta(minutes=self.build_timeout_in_minutes or 240)
