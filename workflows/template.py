"""The AIB image template (Microsoft.VirtualMachineImages/imageTemplates), as strict pydantic models.

kiln takes a template exactly as AIB takes it, so the models follow AIB API 2024-02-01: field names are
matched case-sensitively, JSON types are not coerced, and an unknown field is an error that names the
closest known field. What real templates carry beyond that is accepted as it is: the ARM envelope
(`type`, `apiVersion`, `name`, `dependsOn`...), read-only fields that GET returns (`exactVersion`,
`provisioningState`, `lastRunStatus`...), and `<placeholder>` strings from documentation templates
wherever a value has a format to check.

Every problem is reported at once. Cross-field rules (exactly one of `scriptUri`/`inline`, ...) are read
from the input beside pydantic's own field checks, so a template with a misspelled field and a rule
broken elsewhere gets both reported in one `TemplateError`, each with its AIB-style JSON path.

Nothing here does I/O at import or in `parse_template`: the module runs inside the workflow sandbox.
Only `load_template` reads files, and only when called.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from workflows.camel import CamelModel

# --------------------------------------------------------------------------------------------------
# Value formats

_PLACEHOLDER = re.compile(r"<[^<>]+>")
_RESOURCE_GROUP_ID = r"/subscriptions/[^/]+/resourceGroups/[^/]+"
_GALLERY_IMAGE = _RESOURCE_GROUP_ID + r"/providers/Microsoft\.Compute/galleries/[^/]+/images/[^/]+"
_NAME = r"[A-Za-z0-9_.-]{1,64}"
_SHA256 = r"[0-9a-f]{64}"


def _bad_value(explanation: str) -> PydanticCustomError:
    """A value of the right type but not allowed; the message adds 'Field ... has a bad value' around it."""
    return PydanticCustomError("bad_value", "{kiln_msg}", {"kiln_msg": explanation})


def _format(pattern: str, explanation: str, *, allow_empty: bool = False) -> AfterValidator:
    """A string check whose failure explains the allowed form. A whole `<placeholder>` always passes."""
    compiled = re.compile(pattern, re.IGNORECASE if pattern.startswith("/") else 0)

    def check(value: str) -> str:
        if (allow_empty and value == "") or _PLACEHOLDER.fullmatch(value) or compiled.fullmatch(value):
            return value
        raise _bad_value(explanation)

    return AfterValidator(check)


# Names AIB checks against ^[A-Za-z0-9-_.]{1,64}$; the schema pattern also admits a <placeholder>.
ResourceName = Annotated[
    str,
    _format(_NAME, "It must be 1 to 64 letters, digits, '-', '_' or '.'."),
    Field(json_schema_extra={"pattern": rf"^(<[^<>]+>|{_NAME})$"}),
]
Sha256 = Annotated[
    str,
    _format(
        _SHA256,
        "It must be the SHA-256 of the file as 64 lowercase hex digits, or empty to skip the check.",
        allow_empty=True,
    ),
    Field(json_schema_extra={"pattern": rf"^(<[^<>]+>|{_SHA256})?$"}),
]
ManagedImageId = Annotated[
    str,
    _format(
        _RESOURCE_GROUP_ID + r"/providers/Microsoft\.Compute/images/[^/]+",
        "It must be a managed image id: "
        "/subscriptions/<subscription>/resourceGroups/<group>/providers/Microsoft.Compute/images/<image>.",
    ),
]
GalleryImageId = Annotated[
    str,
    _format(
        _GALLERY_IMAGE + r"(/versions/[^/]+)?",
        "It must be an Azure Compute Gallery image definition id: /subscriptions/<subscription>/resourceGroups/"
        "<group>/providers/Microsoft.Compute/galleries/<gallery>/images/<definition>, "
        "optionally followed by /versions/<version>.",
    ),
]
ImageVersionId = Annotated[
    str,
    _format(
        rf"{_GALLERY_IMAGE}/versions/[^/]+|/(sharedGalleries|communityGalleries)/[^/]+/images/[^/]+/versions/[^/]+",
        "It must be an image version id: /subscriptions/<subscription>/resourceGroups/<group>/providers/"
        "Microsoft.Compute/galleries/<gallery>/images/<definition>/versions/<version or latest>, "
        "or a shared or community gallery image version id.",
    ),
]
_SUBNET_ID = _RESOURCE_GROUP_ID + r"/providers/Microsoft\.Network/virtualNetworks/[^/]+/subnets/[^/]+"
SubnetId = Annotated[
    str,
    _format(
        _SUBNET_ID,
        "It must be a subnet id: /subscriptions/<subscription>/resourceGroups/<group>/providers/"
        "Microsoft.Network/virtualNetworks/<vnet>/subnets/<subnet>.",
        allow_empty=True,
    ),
]
ResourceGroupId = Annotated[
    str,
    _format(
        _RESOURCE_GROUP_ID,
        "It must be a resource group id, /subscriptions/<subscription>/resourceGroups/<name>, "
        "or empty to have a staging group made for the build.",
        allow_empty=True,
    ),
]
# Go durations, as Packer's windows-restart provisioner parses restartTimeout.
Duration = Annotated[
    str,
    _format(
        r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+",
        "It must be a duration of magnitude and unit, such as 5m, 30m or 2h.",
    ),
]
ApiVersion = Annotated[
    str, _format(r"\d{4}-\d{2}-\d{2}(-preview)?", "It must be an API version such as 2024-02-01 or 2019-05-01-preview.")
]
NonEmpty = Annotated[str, Field(min_length=1)]


def _build_timeout(minutes: int) -> int:
    if 1 <= minutes <= 5:
        raise _bad_value(
            "AIB fails builds of 1 to 5 minutes at once ('client_jwt will expire within 5 minutes'): "
            "use 0 for the default of 240 minutes, or 6 to 960."
        )
    return minutes


# --------------------------------------------------------------------------------------------------
# The base of every template model


def _given(value: object) -> bool:
    """AIB reads null, "" and [] as "not set"."""
    return value is not None and value != "" and value != []


def _field(data: object, alias: str) -> Any:
    """One field of a model's input by its JSON name: raw input (a dict) or an already built model."""
    if isinstance(data, BaseModel):
        for name, info in type(data).model_fields.items():
            if (info.alias or name) == alias:
                return getattr(data, name)
        return None
    if isinstance(data, dict):
        return data[alias] if alias in data else data.get(to_snake(alias))
    return None


def _custom(
    kind: str, message: str, loc: tuple[str | int, ...], value: object, ctx: dict | None = None
) -> InitErrorDetails:
    # kiln_msg goes last: pydantic-core substitutes context keys in order, so the finished text is not rescanned.
    context = {**(ctx or {}), "kiln_msg": message}
    return InitErrorDetails(type=PydanticCustomError(kind, "{kiln_msg}", context), loc=loc, input=value)


def _json_title(name: str, info: Any) -> str:
    # Runs before the alias generator fills info.alias, so derive the JSON name the same way.
    return info.alias or to_camel(name)


class AibModel(CamelModel):
    """Strict as AIB 2024-02-01 is: no type coercion, unknown fields rejected, cross-field rules checked."""

    model_config = ConfigDict(extra="forbid", strict=True, field_title_generator=_json_title)

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Rules read the raw input, so they are reported even when some field of this model is invalid.
        broken = list(cls._rules(data)) if isinstance(data, dict) else []
        try:
            model = handler(data)
        except ValidationError as err:
            errors = [cls._explain(e) for e in err.errors(include_url=False)]
            raise ValidationError.from_exception_data(cls.__name__, [*errors, *broken]) from None
        if broken:
            raise ValidationError.from_exception_data(cls.__name__, broken)
        return model

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        """Cross-field rules of this model; each yields an error located relative to the model."""
        return iter(())

    @classmethod
    def _explain(cls, error: ErrorDetails) -> InitErrorDetails:
        """Carry a field error up unchanged, naming the closest known field for an unknown one."""
        loc = error["loc"]
        if error["type"] == "extra_forbidden" and len(loc) == 1:
            return _custom("unknown_field", cls._unknown_field(str(loc[0])), loc, error["input"])
        return _custom(error["type"], error["msg"], loc, error["input"], error.get("ctx"))

    @classmethod
    def _unknown_field(cls, key: str) -> str:
        known = [info.alias or name for name, info in cls.model_fields.items()]
        folded = {k.lower(): k for k in known}
        match = difflib.get_close_matches(key.lower().replace("_", ""), list(folded), n=1, cutoff=0.6)
        if not match:
            return f"Unknown field '{key}'. Fields allowed here: {', '.join(known)}."
        hint = ""
        if match[0] == key.lower():
            hint = " Field names are case-sensitive."
        elif match[0] == key.lower().replace("_", ""):
            hint = " Field names are camelCase."
        return f"Unknown field '{key}'; did you mean '{folded[match[0]]}'?{hint}"


def _rule(message: str, data: dict, *loc: str | int) -> InitErrorDetails:
    return _custom("rule", message, loc, data)


# --------------------------------------------------------------------------------------------------
# source


class PlanInfo(AibModel):
    """Purchase plan of a marketplace image; AIB needs all three parts."""

    plan_name: str
    plan_product: str
    plan_publisher: str


class PlatformImageSource(AibModel):
    """A marketplace (platform) image. `latest` is resolved when the build runs, not when it is submitted."""

    type: Literal["PlatformImage"]
    publisher: NonEmpty
    offer: NonEmpty
    sku: NonEmpty
    version: NonEmpty = "latest"
    plan_info: PlanInfo | None = None
    exact_version: str | None = Field(None, description="Read-only in AIB: the version `latest` resolved to.")


class ManagedImageSource(AibModel):
    """A generalized managed image in the template's subscription and region."""

    type: Literal["ManagedImage"]
    image_id: ManagedImageId


class SharedImageVersionSource(AibModel):
    """An Azure Compute Gallery image version; a version named `latest` is resolved when the build runs."""

    type: Literal["SharedImageVersion"]
    image_version_id: ImageVersionId
    exact_version: str | None = Field(None, description="Read-only in AIB: the version id `latest` resolved to.")


Source = Annotated[PlatformImageSource | ManagedImageSource | SharedImageVersionSource, Field(discriminator="type")]

# --------------------------------------------------------------------------------------------------
# customize and validate


def _script_rules(data: dict) -> Iterator[InitErrorDetails]:
    script, inline = _given(_field(data, "scriptUri")), _given(_field(data, "inline"))
    if script == inline:
        has = "both" if script else "neither"
        yield _rule(f"Exactly one of 'scriptUri' or 'inline' can be specified; this step has {has}.", data)


class ShellCustomizer(AibModel):
    """Runs a shell script (Linux), from `scriptUri` or `inline` commands; a non-zero exit fails the build."""

    type: Literal["Shell"]
    name: str = ""
    script_uri: str | None = None
    inline: list[str] | None = None
    sha256_checksum: Sha256 = ""

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        yield from _script_rules(data)


class PowerShellCustomizer(AibModel):
    """Runs a PowerShell script (Windows); `validExitCodes` lists the exit codes that count as success."""

    type: Literal["PowerShell"]
    name: str = ""
    script_uri: str | None = None
    inline: list[str] | None = None
    sha256_checksum: Sha256 = ""
    run_elevated: bool = False
    run_as_system: bool = Field(False, description="Run as Local System; can only be true when runElevated is true.")
    valid_exit_codes: list[int] = [0]

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        yield from _script_rules(data)
        if _field(data, "runAsSystem") is True and _field(data, "runElevated") is not True:
            yield _rule("'runAsSystem' can only be true when 'runElevated' is true.", data, "runAsSystem")


class FileCustomizer(AibModel):
    """Downloads one file to `destination` on the build VM (whose parent directory must exist)."""

    type: Literal["File"]
    name: str = ""
    source_uri: NonEmpty
    destination: NonEmpty
    sha256_checksum: Sha256 = ""


class WindowsRestartCustomizer(AibModel):
    """Restarts a Windows build VM and waits for it; there is no Linux equivalent in AIB."""

    type: Literal["WindowsRestart"]
    name: str = ""
    restart_command: str = 'shutdown /r /f /t 0 /c "packer restart"'
    restart_check_command: str = ""
    restart_timeout: Duration = "5m"


class WindowsUpdateCustomizer(AibModel):
    """Installs Windows updates, restarting as needed; `updateLimit` 0 means 1000."""

    type: Literal["WindowsUpdate"]
    name: str = ""
    search_criteria: str = ""
    filters: list[str] = []
    update_limit: int = Field(0, ge=0)


Customizer = Annotated[
    ShellCustomizer | PowerShellCustomizer | FileCustomizer | WindowsRestartCustomizer | WindowsUpdateCustomizer,
    Field(discriminator="type"),
]
Validator = Annotated[ShellCustomizer | PowerShellCustomizer | FileCustomizer, Field(discriminator="type")]


class Validation(AibModel):
    """Checks run on a VM made from the built image; a failure fails the run even when distributed."""

    continue_distribute_on_failure: bool = Field(
        False, description="Distribute the image even when validation fails (the run is still reported Failed)."
    )
    source_validation_only: bool = Field(False, description="Validate the source image itself; no build is run.")
    in_vm_validations: list[Validator] = Field([], alias="inVMValidations", description="Validation steps, in order.")


# --------------------------------------------------------------------------------------------------
# distribute

StorageAccountType = Literal["Standard_LRS", "Standard_ZRS", "Premium_LRS"]


class TargetRegion(AibModel):
    """One region a gallery image version is replicated to."""

    name: NonEmpty
    replica_count: int = Field(1, ge=1)
    storage_account_type: StorageAccountType = "Standard_LRS"


class Versioning(AibModel):
    """How the next x.y.z gallery version is chosen: `Latest` (optionally within `major`) or `Source`'s."""

    scheme: Literal["Latest", "Source"]
    major: int = Field(-1, ge=-1, description="With scheme Latest: the major version to continue; -1 means unset.")

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        if _field(data, "scheme") == "Source" and _field(data, "major") not in (None, -1):
            yield _rule("'major' applies only to scheme 'Latest'.", data, "major")


class ManagedImageDistributor(AibModel):
    """Writes a managed image; its resource group must exist."""

    type: Literal["ManagedImage"]
    run_output_name: ResourceName
    artifact_tags: dict[str, str] = {}
    image_id: ManagedImageId
    location: NonEmpty


class SharedImageDistributor(AibModel):
    """Writes an Azure Compute Gallery image version; the gallery and image definition must exist."""

    type: Literal["SharedImage"]
    run_output_name: ResourceName
    artifact_tags: dict[str, str] = {}
    gallery_image_id: GalleryImageId
    replication_regions: list[str] | None = Field(None, description="Deprecated: use targetRegions.")
    target_regions: list[TargetRegion] | None = None
    storage_account_type: StorageAccountType | None = Field(
        None, description="Deprecated: only with replicationRegions; use targetRegions[].storageAccountType."
    )
    exclude_from_latest: bool = False
    versioning: Versioning | None = None
    replication_mode: Literal["Full", "Shallow"] | None = None

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        legacy, targets = _given(_field(data, "replicationRegions")), _given(_field(data, "targetRegions"))
        if legacy and targets:
            yield _rule(
                "'replicationRegions' and 'targetRegions' cannot both be given; use 'targetRegions' "
                "('replicationRegions' is deprecated).",
                data,
            )
        elif not legacy and not targets:
            yield _rule(
                "Give the regions to replicate to in 'targetRegions' (or the deprecated 'replicationRegions').", data
            )
        if _field(data, "storageAccountType") is not None and not legacy:
            yield _rule(
                "'storageAccountType' can be given only with 'replicationRegions'; "
                "with 'targetRegions' set 'storageAccountType' on each region.",
                data,
                "storageAccountType",
            )

    def regions(self) -> list[TargetRegion]:
        """targetRegions, or the legacy replicationRegions with storageAccountType."""
        if self.target_regions:
            return self.target_regions
        return [
            TargetRegion(name=r, storage_account_type=self.storage_account_type or "Standard_LRS")
            for r in self.replication_regions or []
        ]


class VhdDistributor(AibModel):
    """Writes a VHD blob: to `uri`, or when it is empty to the staging storage account."""

    type: Literal["VHD"]
    run_output_name: ResourceName
    artifact_tags: dict[str, str] = {}
    uri: str | None = None


Distributor = Annotated[ManagedImageDistributor | SharedImageDistributor | VhdDistributor, Field(discriminator="type")]

# --------------------------------------------------------------------------------------------------
# vmProfile and the rest of properties


class VnetConfig(AibModel):
    """Puts the build VM on an existing subnet (with a proxy VM, or with an ACI subnet for isolated builds)."""

    subnet_id: SubnetId | None = None
    container_instance_subnet_id: SubnetId | None = Field(
        None, description="Subnet for the build container; needs subnetId, in the same virtual network."
    )
    proxy_vm_size: str = Field("", description="Proxy VM size; not with containerInstanceSubnetId.")

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        subnet, aci = _field(data, "subnetId"), _field(data, "containerInstanceSubnetId")
        if _given(aci):
            if not _given(subnet):
                yield _rule(
                    "'containerInstanceSubnetId' can be given only together with 'subnetId'.",
                    data,
                    "containerInstanceSubnetId",
                )
            elif all(isinstance(i, str) and re.fullmatch(_SUBNET_ID, i, re.IGNORECASE) for i in (aci, subnet)):
                if aci.lower() == subnet.lower():
                    yield _rule(
                        "'containerInstanceSubnetId' must be a different subnet from 'subnetId'.",
                        data,
                        "containerInstanceSubnetId",
                    )
                elif aci.lower().rpartition("/subnets/")[0] != subnet.lower().rpartition("/subnets/")[0]:
                    yield _rule(
                        "'containerInstanceSubnetId' must be in the same virtual network as 'subnetId'.",
                        data,
                        "containerInstanceSubnetId",
                    )
            if _given(_field(data, "proxyVmSize")):
                yield _rule(
                    "'proxyVmSize' must not be given with 'containerInstanceSubnetId': no proxy VM is deployed then.",
                    data,
                    "proxyVmSize",
                )


class VmProfile(AibModel):
    """The build (and validation) VM: size, OS disk size, identities and network."""

    vm_size: str = Field("", description="Build VM size; empty means Standard_D1_v2 (Gen1) or Standard_D2ds_v4 (Gen2).")
    os_disk_size_gb: int = Field(0, ge=0, alias="osDiskSizeGB", description="OS disk size; 0 keeps the source's.")
    user_assigned_identities: list[str] = Field([], description="Managed identities attached to the build VM.")
    vnet_config: VnetConfig | None = None


class ErrorHandling(AibModel):
    """On a failed step: `cleanup` (the default) deletes the build VM, `abort` keeps it for debugging."""

    on_customizer_error: Literal["cleanup", "abort"] = "cleanup"
    on_validation_error: Literal["cleanup", "abort"] = "cleanup"


class VmBoot(AibModel):
    state: Literal["Enabled", "Disabled"] = "Disabled"


class OptimizeWorkload(AibModel):
    """Optimizes the image for a workload with a script."""

    state: Literal["Enabled", "Disabled"] = "Disabled"
    script_uri: str | None = None
    sha256_checksum: Sha256 = ""


class Optimize(AibModel):
    vm_boot: VmBoot | None = Field(None, description="Optimize the captured image for faster VM boot.")
    workload: OptimizeWorkload | None = None


class AutoRun(AibModel):
    state: Literal["Enabled", "Disabled"] = Field(
        "Disabled", description="Enabled: build once when the template is created."
    )


class DataDisk(AibModel):
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


class TemplateProperties(AibModel):
    """What to build: source, customization steps, validation, distribution targets and build VM."""

    source: Source = Field(description="The image to start from.")
    customize: list[Customizer] = Field([], description="Customization steps, run in order.")
    validation: Validation | None = Field(default=None, alias="validate", description="Validation of the built image.")
    distribute: list[Distributor] = Field(
        min_length=1, description="Where the image goes; each target has its own runOutputName."
    )
    vm_profile: VmProfile = VmProfile()
    staging_resource_group: ResourceGroupId | None = Field(
        None, description="Resource group id for the build's temporary resources; empty makes one per build."
    )
    error_handling: ErrorHandling = ErrorHandling()
    optimize: Optimize | None = None
    build_timeout_in_minutes: Annotated[int, AfterValidator(_build_timeout)] = Field(
        0, ge=0, le=960, description="Whole-build timeout, distribution included: 0 (4 hours) or 6 to 960 minutes."
    )
    auto_run: AutoRun | None = None
    managed_resource_tags: dict[str, str] = Field({}, description="Tags for the resources a build creates.")
    additional_data_disks: list[DataDisk] = []
    provisioning_state: Literal["Creating", "Updating", "Succeeded", "Failed", "Deleting", "Canceled"] | None = Field(
        None, description="Read-only in AIB; accepted and ignored."
    )
    provisioning_error: ProvisioningError | None = None
    last_run_status: LastRunStatus | None = None
    exact_staging_resource_group: str | None = Field(None, description="Read-only in AIB; accepted and ignored.")

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        targets = _field(data, "distribute")
        first: dict[str, int] = {}
        for index, target in enumerate(targets if isinstance(targets, list) else []):
            name = _field(target, "runOutputName")
            if not isinstance(name, str):
                continue
            if name in first:
                yield _rule(
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
        identities = _field(data, "userAssignedIdentities")
        if isinstance(identities, dict) and len(identities) > 1:
            yield _rule(
                f"Only one user-assigned identity is supported; {len(identities)} are given.",
                data,
                "userAssignedIdentities",
            )


class ImageTemplate(AibModel):
    """An AIB image template: the resource body PUT to Microsoft.VirtualMachineImages/imageTemplates.

    `identity` is optional although AIB requires it since 2020-02-14: local builds need none, and older
    templates omit it.
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


# --------------------------------------------------------------------------------------------------
# Errors


class TemplateIssue(CamelModel):
    """One problem: `path` is AIB-style (`properties.distribute[0].runOutputName`), "" for the whole file."""

    path: str
    message: str


class TemplateError(ValueError):
    """Every problem with a template at once, each naming its JSON path."""

    def __init__(self, issues: list[TemplateIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(f"Validation failed: '{_qualified(i.path)}': {i.message}" for i in issues))

    def __reduce__(self) -> tuple[type[TemplateError], tuple[list[TemplateIssue]]]:
        return type(self), (self.issues,)


def _qualified(path: str) -> str:
    if not path:
        return "ImageTemplate"
    return f"ImageTemplate{path}" if path.startswith("[") else f"ImageTemplate.{path}"


_IDENTIFIER = re.compile(r"[A-Za-z_$][\w$-]*")


def _format_path(loc: tuple[str | int, ...]) -> str:
    """`('properties', 'customize', 2, 'inline', 0)` -> `properties.customize[2].inline[0]`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            path += f".{part}" if path else part
        else:
            path += f"['{part}']"
    return path


def _json_loc(loc: tuple[str | int, ...], raw: object) -> tuple[str | int, ...]:
    """Drop the union tags pydantic puts in a location (`customize, 2, 'Shell', ...`): AIB paths have none."""
    kept: list[str | int] = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and part not in node and part == node.get("type"):
            continue
        kept.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(kept)


def _union_tags(union: Any) -> list[str]:
    return [get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(union)[0])]


_UNIONS = {
    "source": ("source", _union_tags(Source)),
    "customize": ("customizer", _union_tags(Customizer)),
    "inVMValidations": ("validator", _union_tags(Validator)),
    "distribute": ("distribution target", _union_tags(Distributor)),
}

_KINDS_OF_VALUE = {
    "string_type": "It must be a string.",
    "int_type": "It must be a whole number.",
    "int_parsing": "It must be a whole number.",
    "int_from_float": "It must be a whole number.",
    "bool_type": "It must be true or false.",
    "list_type": "It must be a list.",
    "dict_type": "It must be an object.",
    "model_type": "It must be an object.",
    "model_attributes_type": "It must be an object.",
    "string_too_short": "It must not be empty.",
}


def _shown(value: object) -> str:
    text = f"'{value}'" if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _issue(error: ErrorDetails, raw: object) -> TemplateIssue:
    """One pydantic error as AIB would word it, at its AIB-style path."""
    loc = _json_loc(error["loc"], raw)
    kind, ctx, value = error["type"], error.get("ctx") or {}, error["input"]
    container = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind in ("union_tag_invalid", "union_tag_not_found") and container in _UNIONS:
        what, tags = _UNIONS[container]
        allowed = f"Allowed types: {', '.join(tags)}."
        if kind == "union_tag_not_found":
            return TemplateIssue(path=_format_path((*loc, "type")), message=f"Missing field 'type'. {allowed}")
        return TemplateIssue(
            path=_format_path((*loc, "type")), message=f"Unknown {what} type {_shown(ctx.get('tag'))}. {allowed}"
        )
    path = _format_path(loc)
    # The field named in the message: the last name with any indexes after it, e.g. `inline[1]`.
    last_name = max((i for i, p in enumerate(loc) if isinstance(p, str)), default=0)
    field = "".join(f"[{p}]" if isinstance(p, int) else p for p in loc[last_name:])
    if kind == "missing":
        return TemplateIssue(path=path, message=f"Missing field '{field}'.")
    if kind in ("unknown_field", "rule"):
        return TemplateIssue(path=path, message=error["msg"])
    if not loc:
        return TemplateIssue(path="", message="The template must be a JSON object.")
    if kind == "bad_value":
        why = error["msg"]
    elif kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        why = f"Allowed values: {expected}."
        if isinstance(value, str) and f"'{value.lower()}'" in expected.lower():
            why += " Values are case-sensitive."
    elif kind == "greater_than_equal":
        why = f"It must be at least {ctx.get('ge')}."
    elif kind == "less_than_equal":
        why = f"It must be at most {ctx.get('le')}."
    elif kind == "too_short" and field in _UNIONS:
        what, tags = _UNIONS[field]
        why = f"It must list at least one {what} ({', '.join(tags)})."
    elif kind == "too_short":
        why = f"It must have at least {ctx.get('min_length')} item(s)."
    else:
        why = _KINDS_OF_VALUE.get(kind, error["msg"] + ".")
    return TemplateIssue(path=path, message=f"Field '{field}' has a bad value: {_shown(value)}. {why}")


def _issues(err: ValidationError, raw: object) -> list[TemplateIssue]:
    issues: list[TemplateIssue] = []
    for error in err.errors(include_url=False):
        issue = _issue(error, raw)
        if issue not in issues:
            issues.append(issue)
    return issues


# --------------------------------------------------------------------------------------------------
# ARM deployment templates that wrap an image template

_IMAGE_TEMPLATE_TYPE = "microsoft.virtualmachineimages/imagetemplates"


class _ArmError(Exception):
    pass


def is_arm_wrapper(doc: object) -> bool:
    """An ARM deployment template (with `resources`) rather than a plain image template body."""
    return isinstance(doc, dict) and ("resources" in doc or "deploymentTemplate" in str(doc.get("$schema", "")))


def _parameter_values(parameters: dict | None) -> dict[str, Any]:
    """Values from an ARM parameters file (`{"parameters": {"x": {"value": ...}}}`) or a plain `{"x": ...}`."""
    if not parameters:
        return {}
    inner = parameters.get("parameters")
    arm_file = isinstance(inner, dict) and (
        "$schema" in parameters
        or "contentVersion" in parameters
        or all(isinstance(v, dict) and "value" in v for v in inner.values())
    )
    if arm_file:
        return {k.lower(): v["value"] for k, v in inner.items() if isinstance(v, dict) and "value" in v}
    return {k.lower(): v for k, v in parameters.items()}


_TOKEN = re.compile(r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<number>-?\d+)|(?P<name>[A-Za-z_]\w*)|(?P<punct>[(),.\[\]]))")


class _ArmScope:
    """Evaluates the ARM template language as far as image templates use it: parameters(), variables(), concat()."""

    def __init__(self, doc: dict, parameters: dict | None) -> None:
        declared = doc.get("parameters")
        variables = doc.get("variables")
        self.declared = {k.lower(): v for k, v in declared.items()} if isinstance(declared, dict) else {}
        self.variables = {k.lower(): v for k, v in variables.items()} if isinstance(variables, dict) else {}
        self.given = _parameter_values(parameters)
        self.resolving: set[str] = set()

    def resolve(self, node: Any, loc: tuple[str | int, ...], issues: list[TemplateIssue] | None) -> Any:
        """`node` with every expression evaluated. Failures go to `issues`, or raise when it is None."""
        if isinstance(node, dict):
            return {self._key(k, loc, issues): self.resolve(v, (*loc, k), issues) for k, v in node.items()}
        if isinstance(node, list):
            return [self.resolve(v, (*loc, i), issues) for i, v in enumerate(node)]
        if not isinstance(node, str) or not node.startswith("[") or not node.endswith("]"):
            return node
        if node.startswith("[["):
            return node[1:]
        try:
            return self.evaluate(node[1:-1])
        except _ArmError as err:
            if issues is None:
                raise
            issues.append(TemplateIssue(path=_format_path(loc), message=f"Cannot resolve {node}: {err}"))
            return node

    def _key(self, key: str, loc: tuple[str | int, ...], issues: list[TemplateIssue] | None) -> str:
        """ARM evaluates expressions in property names too (userAssignedIdentities keys often use one)."""
        resolved = self.resolve(key, loc, issues)
        if isinstance(resolved, str):
            return resolved
        why = f"a property name must be a string, not {_shown(resolved)}"
        if issues is None:
            raise _ArmError(why)
        issues.append(TemplateIssue(path=_format_path(loc), message=f"Cannot resolve {key}: {why}"))
        return key

    def evaluate(self, text: str) -> Any:
        tokens: list[tuple[str | None, str]] = []
        position = 0
        while text[position:].strip():
            match = _TOKEN.match(text, position)
            if not match:
                raise _ArmError(f"cannot read the expression at '{text[position:].strip()}'")
            tokens.append((match.lastgroup, match.group(match.lastgroup or 0)))
            position = match.end()
        value, rest = self._expression(tokens)
        if rest:
            raise _ArmError(f"unexpected '{rest[0][1]}' in the expression")
        return value

    def _expression(self, tokens: list[tuple[str | None, str]]) -> tuple[Any, list[tuple[str | None, str]]]:
        if not tokens:
            raise _ArmError("the expression is incomplete")
        (kind, text), rest = tokens[0], tokens[1:]
        if kind == "string":
            value: Any = text[1:-1].replace("''", "'")
        elif kind == "number":
            value = int(text)
        elif kind == "name" and rest[:1] == [("punct", "(")]:
            args, rest = self._arguments(rest[1:])
            value = self._call(text, args)
        else:
            raise _ArmError(f"unexpected '{text}' in the expression")
        while rest[:1] in ([("punct", ".")], [("punct", "[")]):
            if rest[0][1] == ".":
                if len(rest) < 2 or rest[1][0] != "name":
                    raise _ArmError("a property name must follow '.'")
                value, rest = self._member(value, rest[1][1]), rest[2:]
            else:
                index, rest = self._expression(rest[1:])
                if rest[:1] != [("punct", "]")]:
                    raise _ArmError("missing ']'")
                value, rest = self._member(value, index), rest[1:]
        return value, rest

    def _arguments(self, tokens: list[tuple[str | None, str]]) -> tuple[list[Any], list[tuple[str | None, str]]]:
        args: list[Any] = []
        if tokens[:1] == [("punct", ")")]:
            return args, tokens[1:]
        while True:
            value, tokens = self._expression(tokens)
            args.append(value)
            if tokens[:1] == [("punct", ")")]:
                return args, tokens[1:]
            if tokens[:1] != [("punct", ",")]:
                raise _ArmError("missing ')' or ','")
            tokens = tokens[1:]

    @staticmethod
    def _member(value: Any, key: Any) -> Any:
        if isinstance(value, dict) and isinstance(key, str):
            found = {k.lower(): v for k, v in value.items()}
            if key.lower() in found:
                return found[key.lower()]
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            return value[key]
        raise _ArmError(f"the value has no member {_shown(key)}")

    def _call(self, function: str, args: list[Any]) -> Any:
        name = function.lower()
        if name in ("parameters", "variables"):
            if len(args) != 1 or not isinstance(args[0], str):
                raise _ArmError(f"{function}() takes one name")
            return self._parameter(args[0]) if name == "parameters" else self._variable(args[0])
        if name == "concat":
            if args and all(isinstance(a, list) for a in args):
                return [item for a in args for item in a]
            if any(isinstance(a, (list, dict)) for a in args):
                raise _ArmError("concat() takes only strings, or only arrays")
            return "".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
        raise _ArmError(
            f"function '{function}' is not supported; kiln resolves parameters(), variables() and concat() "
            "(give the value as a parameter instead)"
        )

    def _parameter(self, name: str) -> Any:
        key = name.lower()
        if key not in self.declared:
            raise _ArmError(f"parameter '{name}' is not declared in the template's parameters")
        if key in self.given:
            return self.given[key]
        declared = self.declared[key]
        if isinstance(declared, dict) and "defaultValue" in declared:
            return self.resolve(declared["defaultValue"], (), None)
        raise _ArmError(
            f"parameter '{name}' has no value: give it in the parameters, or a defaultValue in the template"
        )

    def _variable(self, name: str) -> Any:
        key = name.lower()
        if key not in self.variables:
            raise _ArmError(f"variable '{name}' is not declared in the template's variables")
        if key in self.resolving:
            raise _ArmError(f"variable '{name}' refers to itself")
        self.resolving.add(key)
        try:
            return self.resolve(self.variables[key], (), None)
        finally:
            self.resolving.discard(key)


def resolve_arm_wrapper(doc: dict, parameters: dict | None = None) -> tuple[dict, str | None]:
    """The imageTemplates resource of an ARM deployment template, expressions resolved, and its name.

    `parameters` is an ARM parameters file (`{"parameters": {"x": {"value": ...}}}`) or a plain
    `{"x": value}`; a parameter's defaultValue applies when it is not given. Every expression that cannot
    be resolved is reported at once, at the path inside the resource where it occurs.
    """
    resources = doc.get("resources")
    if isinstance(resources, dict):  # languageVersion 2.0: resources keyed by symbolic name
        resources = list(resources.values())
    if not isinstance(resources, list):
        raise TemplateError(
            [TemplateIssue(path="resources", message="An ARM deployment template needs a 'resources' list.")]
        )
    found = [r for r in resources if isinstance(r, dict) and str(r.get("type", "")).lower() == _IMAGE_TEMPLATE_TYPE]
    if len(found) != 1:
        raise TemplateError(
            [
                TemplateIssue(
                    path="resources",
                    message=f"Expected exactly one Microsoft.VirtualMachineImages/imageTemplates resource; "
                    f"the ARM template has {len(found)}.",
                )
            ]
        )
    issues: list[TemplateIssue] = []
    body = _ArmScope(doc, parameters).resolve(found[0], (), issues)
    if issues:
        raise TemplateError(issues)
    name = body.get("name")
    return body, name if isinstance(name, str) else None


# --------------------------------------------------------------------------------------------------
# Entry points


def parse_template(raw: dict, *, parameters: dict | None = None) -> ImageTemplate:
    """Validate an AIB template (plain, or an ARM deployment wrapper resolved with ``parameters``).

    Raises TemplateError listing every problem. Field names are matched by their JSON (camelCase) names
    only, as AIB does; Python code that builds models directly may still use snake_case names.
    """
    if is_arm_wrapper(raw):
        raw, _ = resolve_arm_wrapper(raw, parameters)
    try:
        return ImageTemplate.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as err:
        raise TemplateError(_issues(err, raw)) from None


def _read_json(path: Path) -> Any:
    text = path.read_text(encoding="utf-8-sig")  # editors on Windows often write a BOM
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TemplateError(
            [
                TemplateIssue(
                    path="", message=f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}."
                )
            ]
        ) from None


def load_template(path: str | Path, parameters_path: str | Path | None = None) -> tuple[dict, str | None]:
    """Read and validate a template file; return the plain template dict (the build's input) and its name.

    An ARM deployment template is resolved with the parameters file. The name is the ARM resource's
    `name`, or the body's own `name` when a plain template carries one. Raises TemplateError for invalid
    JSON (with line and column) and for every problem in the template; OSError when a file cannot be read.
    """
    doc = _read_json(Path(path))
    parameters = _read_json(Path(parameters_path)) if parameters_path is not None else None
    if parameters is not None and not isinstance(parameters, dict):
        raise TemplateError([TemplateIssue(path="", message=f"{parameters_path}: parameters must be a JSON object.")])
    if is_arm_wrapper(doc):
        doc, name = resolve_arm_wrapper(doc, parameters)
    else:
        name = doc.get("name") if isinstance(doc, dict) and isinstance(doc.get("name"), str) else None
    parse_template(doc)
    return doc, name


def template_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of an image template by its JSON names, for editors and `kiln validate`."""
    schema = ImageTemplate.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


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
