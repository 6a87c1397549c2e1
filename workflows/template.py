"""The AIB image template (Microsoft.VirtualMachineImages/imageTemplates), as pydantic models.

SKELETON: field names and class names here are the interface the rest of kiln uses; keep them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import Field

from workflows.camel import CamelModel


class PlanInfo(CamelModel):
    plan_name: str
    plan_product: str
    plan_publisher: str


class PlatformImageSource(CamelModel):
    type: Literal["PlatformImage"]
    publisher: str = ""
    offer: str = ""
    sku: str = ""
    version: str = "latest"
    plan_info: PlanInfo | None = None
    exact_version: str | None = None  # read-only in AIB; accepted and ignored


class ManagedImageSource(CamelModel):
    type: Literal["ManagedImage"]
    image_id: str


class SharedImageVersionSource(CamelModel):
    type: Literal["SharedImageVersion"]
    image_version_id: str
    exact_version: str | None = None


Source = Annotated[PlatformImageSource | ManagedImageSource | SharedImageVersionSource, Field(discriminator="type")]


class ShellCustomizer(CamelModel):
    type: Literal["Shell"]
    name: str = ""
    script_uri: str | None = None
    inline: list[str] | None = None
    sha256_checksum: str = ""


class PowerShellCustomizer(CamelModel):
    type: Literal["PowerShell"]
    name: str = ""
    script_uri: str | None = None
    inline: list[str] | None = None
    sha256_checksum: str = ""
    run_elevated: bool = False
    run_as_system: bool = False
    valid_exit_codes: list[int] = [0]


class FileCustomizer(CamelModel):
    type: Literal["File"]
    name: str = ""
    source_uri: str
    destination: str
    sha256_checksum: str = ""


class WindowsRestartCustomizer(CamelModel):
    type: Literal["WindowsRestart"]
    name: str = ""
    restart_command: str = 'shutdown /r /f /t 0 /c "packer restart"'
    restart_check_command: str = ""
    restart_timeout: str = "5m"


class WindowsUpdateCustomizer(CamelModel):
    type: Literal["WindowsUpdate"]
    name: str = ""
    search_criteria: str = ""
    filters: list[str] = []
    update_limit: int = 0


Customizer = Annotated[
    ShellCustomizer | PowerShellCustomizer | FileCustomizer | WindowsRestartCustomizer | WindowsUpdateCustomizer,
    Field(discriminator="type"),
]
Validator = Annotated[ShellCustomizer | PowerShellCustomizer | FileCustomizer, Field(discriminator="type")]


class Validation(CamelModel):
    continue_distribute_on_failure: bool = False
    source_validation_only: bool = False
    in_vm_validations: list[Validator] = []


class TargetRegion(CamelModel):
    name: str
    replica_count: int = 1
    storage_account_type: str = "Standard_LRS"


class Versioning(CamelModel):
    scheme: Literal["Latest", "Source"]
    major: int = -1


class ManagedImageDistributor(CamelModel):
    type: Literal["ManagedImage"]
    run_output_name: str
    artifact_tags: dict[str, str] = {}
    image_id: str
    location: str


class SharedImageDistributor(CamelModel):
    type: Literal["SharedImage"]
    run_output_name: str
    artifact_tags: dict[str, str] = {}
    gallery_image_id: str
    replication_regions: list[str] | None = None
    target_regions: list[TargetRegion] | None = None
    storage_account_type: str | None = None
    exclude_from_latest: bool = False
    versioning: Versioning | None = None

    def regions(self) -> list[TargetRegion]:
        """targetRegions, or the legacy replicationRegions with storageAccountType."""
        if self.target_regions is not None:
            return self.target_regions
        return [
            TargetRegion(name=r, storage_account_type=self.storage_account_type or "Standard_LRS")
            for r in self.replication_regions or []
        ]


class VhdDistributor(CamelModel):
    type: Literal["VHD"]
    run_output_name: str
    artifact_tags: dict[str, str] = {}
    uri: str | None = None


Distributor = Annotated[
    ManagedImageDistributor | SharedImageDistributor | VhdDistributor, Field(discriminator="type")
]


class VnetConfig(CamelModel):
    subnet_id: str | None = None
    container_instance_subnet_id: str | None = None
    proxy_vm_size: str = ""


class VmProfile(CamelModel):
    vm_size: str = ""
    os_disk_size_gb: int = 0
    user_assigned_identities: list[str] = []
    vnet_config: VnetConfig | None = None


class ErrorHandling(CamelModel):
    on_customizer_error: Literal["cleanup", "abort"] = "cleanup"
    on_validation_error: Literal["cleanup", "abort"] = "cleanup"


class VmBoot(CamelModel):
    state: Literal["Enabled", "Disabled"] = "Disabled"


class Optimize(CamelModel):
    vm_boot: VmBoot | None = None


class AutoRun(CamelModel):
    state: Literal["Enabled", "Disabled"] = "Disabled"


class TemplateProperties(CamelModel):
    source: Source
    customize: list[Customizer] = []
    validation: Validation | None = Field(default=None, alias="validate")
    distribute: list[Distributor]
    vm_profile: VmProfile = VmProfile()
    staging_resource_group: str | None = None
    error_handling: ErrorHandling = ErrorHandling()
    optimize: Optimize | None = None
    build_timeout_in_minutes: int = 0
    auto_run: AutoRun | None = None
    managed_resource_tags: dict[str, str] = {}

    @property
    def build_timeout(self) -> timedelta:
        """buildTimeoutInMinutes, where 0 means AIB's default of 4 hours."""
        return timedelta(minutes=self.build_timeout_in_minutes or 240)


class TemplateIdentity(CamelModel):
    type: Literal["UserAssigned", "None"]
    user_assigned_identities: dict[str, dict] = {}


class ImageTemplate(CamelModel):
    location: str
    tags: dict[str, str] = {}
    identity: TemplateIdentity | None = None
    properties: TemplateProperties


class TemplateIssue(CamelModel):
    path: str
    message: str


class TemplateError(ValueError):
    """Every problem with a template at once, each naming its JSON path."""

    def __init__(self, issues: list[TemplateIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(f"{i.path}: {i.message}" for i in issues))


def parse_template(raw: dict, *, parameters: dict | None = None) -> ImageTemplate:
    """Validate an AIB template (plain, or an ARM deployment wrapper resolved with ``parameters``)."""
    from pydantic import ValidationError

    try:
        return ImageTemplate.model_validate(raw)
    except ValidationError as err:
        raise TemplateError(
            [TemplateIssue(path=".".join(map(str, e["loc"])), message=e["msg"]) for e in err.errors()]
        ) from None
