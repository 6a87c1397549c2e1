"""What a distribution target must be before a build makes anything, and again when it is written.

AIB's rules: a ManagedImage target's ``imageId`` is a managed image id. A SharedImage target's ``galleryImageId``
is an image definition id (optionally with ``/versions/<x.y.z>``), its gallery and image definition exist already
(AIB does not make them), the definition fits the image (the same OS type and Hyper-V generation), and its regions
are each named once (ARM refuses a version that names one twice: terraform-provider-azurerm#7751). A build is
refused at resolve source, before it pays for anything, when a target breaks one. Each cloud brings the lookups
(``Galleries``) and, where it has only some regions, a check of a region name.

Security types (Trusted Launch, Confidential VM): AIB takes a source of security type Standard,
TrustedLaunchSupported or ConfidentialVMSupported, not one that runs only as TrustedLaunch or ConfidentialVM
(image-builder-overview), and the source's and the gallery definition's security types must match. kiln builds a
Standard image on a Standard VM, captured as a managed image, which a TrustedLaunchSupported definition takes
(packer-plugin-azure#304) and no TrustedLaunch or confidential one does. For a TrustedLaunch definition it builds on
a TrustedLaunch VM (secure boot and vTPM on) and makes the version of its disks' snapshots (``build_security``):
Azure makes no managed image of that VM (hashicorp/packer#13189), and a TrustedLaunchSupported definition takes no
snapshot. So a Standard source writes into a Standard or TrustedLaunchSupported definition (new Gen2 definitions are
TrustedLaunchSupported unless made otherwise: Trusted Launch as default), a TrustedLaunchSupported source into a
TrustedLaunchSupported or a TrustedLaunch one, and a ConfidentialVMSupported source into none: each combination
refused before anything is made.

Shallow replication (``replicationMode: Shallow``, API 2025-10-01) is the gallery's: the version refers to its source
instead of copying it, so it is ready sooner, and so it exists only where its source is, the build's region, as one
replica. A Shallow target that names another region, or more than one replica, is refused before the build.

A gallery version is written in the build's region, where the captured image is, and that region is published to
even when the target does not name it, as Packer and AIB do: ARM makes a version only from a source in its own
region (MicrosoftDocs/azure-docs#28793) and only when its regions contain its own (hashicorp/packer#8895).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from activities.clouds.aib.ids import GalleryRef, ResourceId, parse_gallery_id, parse_managed_image_id, region_key
from activities.clouds.base import PermanentError
from workflows.models import DistributeRequest, ResolvedSource
from workflows.template import ImageTemplate, ManagedImageDistributor, SharedImageDistributor, TargetRegion

STANDARD = "Standard"
_SOURCE_SECURITY_REFUSED = {"trustedlaunch", "confidentialvm"}
# By the source's security type: the gallery definitions whose security type matches it and take kiln's image.
_DEFINITIONS_MATCHING = {
    "standard": {"standard", "trustedlaunchsupported"},
    "trustedlaunchsupported": {"trustedlaunchsupported", "trustedlaunch"},
    "trustedlaunchandconfidentialvmsupported": {"trustedlaunchsupported", "trustedlaunch"},
}
TRUSTED_LAUNCH = "TrustedLaunch"


@dataclass(frozen=True)
class ImageDefinition:
    """What AIB's rules ask of a gallery image definition, and where it lives; ``security_type`` is its
    ``SecurityType`` feature (Standard when it has none)."""

    os_type: str
    hyper_v_generation: str
    location: str
    security_type: str = STANDARD


def check_source_security(security_type: str, *, field: str, image: str) -> None:
    """Refuse a source that runs only as a TrustedLaunch or ConfidentialVM VM.

    Raises:
        PermanentError: ``UnsupportedSecurityType``, naming ``field``.
    """
    if security_type.lower() in _SOURCE_SECURITY_REFUSED:
        raise PermanentError(
            f"{field}: {image} is of security type {security_type}; AIB builds from Standard, "
            "TrustedLaunchSupported and ConfidentialVMSupported sources only",
            kind="UnsupportedSecurityType",
        )


class Galleries(Protocol):
    """How a cloud finds galleries and image definitions."""

    async def gallery_exists(self, ref: GalleryRef) -> bool: ...

    async def image_definition(self, ref: GalleryRef) -> ImageDefinition | None: ...

    def how_to_make(self, ref: GalleryRef) -> str:
        """How to make the gallery and image definition, for the message that says they are missing."""


class RegionCheck(Protocol):
    def __call__(self, region: str, *, field: str) -> object:
        """Refuse a region the cloud does not have, naming ``field``."""


def managed_image_target(target: ManagedImageDistributor, *, index: int) -> ResourceId:
    """The managed image ``properties.distribute[index]`` writes.

    Raises:
        PermanentError: ``BadDistributeType`` when its ``imageId`` is not a managed image id.
    """
    ref = parse_managed_image_id(target.image_id)
    if ref is None:
        raise PermanentError(
            f"properties.distribute[{index}].imageId: '{target.image_id}' is not a managed image id "
            "(/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/images/<name>)",
            kind="BadDistributeType",
        )
    return ref


async def shared_image_target(
    request: DistributeRequest, *, galleries: Galleries
) -> tuple[GalleryRef, ImageDefinition]:
    """The image definition a SharedImage distribution writes a version of, checked against the captured image.

    Raises:
        PermanentError: ``BadSharedImageDistribute``, as ``image_definition_for`` says.
    """
    assert isinstance(request.target, SharedImageDistributor)
    return await image_definition_for(
        request.target,
        index=request.index,
        os_type=request.source.os_type,
        hyper_v_generation=request.image.hyper_v_generation,
        galleries=galleries,
        source_security=request.source.security_type,
    )


async def image_definition_for(
    target: SharedImageDistributor,
    *,
    index: int,
    os_type: str,
    hyper_v_generation: str,
    galleries: Galleries,
    source_security: str = STANDARD,
) -> tuple[GalleryRef, ImageDefinition]:
    """The image definition ``properties.distribute[index]`` writes a version of, checked against an image of
    ``os_type`` and ``hyper_v_generation``.

    Raises:
        PermanentError: ``BadSharedImageDistribute`` when the id is not an image definition's, the gallery or the
            definition does not exist, or the definition's OS type or Hyper-V generation is not the image's.
    """
    field = f"properties.distribute[{index}].galleryImageId"
    ref = parse_gallery_id(target.gallery_image_id)
    if ref is None or ref.image is None:
        raise PermanentError(
            f"{field}: '{target.gallery_image_id}' is not an image definition id "
            "(/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/galleries/<gallery>"
            "/images/<definition>, optionally /versions/<x.y.z>)",
            kind="BadSharedImageDistribute",
        )
    if not await galleries.gallery_exists(ref):
        raise PermanentError(
            f"{field}: the gallery {ref.gallery_id} does not exist. A gallery and image definition must exist "
            f"before a build writes to them; {galleries.how_to_make(ref)}",
            kind="BadSharedImageDistribute",
        )
    definition = await galleries.image_definition(ref)
    if definition is None:
        raise PermanentError(
            f"{field}: the image definition {ref.image_id} does not exist in gallery {ref.gallery}; "
            f"{galleries.how_to_make(ref)}",
            kind="BadSharedImageDistribute",
        )
    if definition.hyper_v_generation != hyper_v_generation:
        raise PermanentError(
            f"{field}: the image is Hyper-V generation {hyper_v_generation}, but the image definition "
            f"{ref.image_id} is {definition.hyper_v_generation}",
            kind="BadSharedImageDistribute",
        )
    if definition.os_type != os_type:
        raise PermanentError(
            f"{field}: the image is {os_type}, the image definition {ref.image_id} is {definition.os_type}",
            kind="BadSharedImageDistribute",
        )
    check_security_match(source_security, definition, field=field, definition_id=ref.image_id)
    return ref, definition


def check_security_match(source_security: str, definition: ImageDefinition, *, field: str, definition_id: str) -> None:
    """Refuse a gallery definition whose security type does not match the source's, or takes no image kiln makes.

    Raises:
        PermanentError: ``BadSharedImageDistribute``, naming ``field``.
    """
    matching = _DEFINITIONS_MATCHING.get(source_security.lower(), set())
    if definition.security_type.lower() in matching:
        return
    if not matching:
        wanted = "none does: kiln builds on a Standard VM, whose image no confidential definition takes"
    else:
        names = {
            "standard": STANDARD,
            "trustedlaunchsupported": "TrustedLaunchSupported",
            "trustedlaunch": TRUSTED_LAUNCH,
        }
        wanted = f"write to a definition of security type {' or '.join(names[m] for m in sorted(matching))}"
    raise PermanentError(
        f"{field}: the image definition {definition_id} is of security type {definition.security_type}, which does "
        f"not match the source's, {source_security}; {wanted}",
        kind="BadSharedImageDistribute",
    )


def target_regions(
    target: SharedImageDistributor, *, index: int, definition: ImageDefinition | None = None
) -> list[tuple[TargetRegion, str]]:
    """Each region a SharedImage target replicates to, with the field that names it.

    A target with neither targetRegions nor replicationRegions (allowed from API 2022-07-01) replicates to its
    image ``definition``'s own region only, named by its galleryImageId.
    """
    regions = target.regions()
    if not regions and definition is not None:
        return [(TargetRegion(name=definition.location), f"properties.distribute[{index}].galleryImageId")]
    given = "targetRegions" if target.target_regions is not None else "replicationRegions"
    return [(r, f"properties.distribute[{index}].{given}[{i}].name") for i, r in enumerate(regions)]


def publishing_regions(
    target: SharedImageDistributor, *, index: int, definition: ImageDefinition, build_location: str
) -> list[TargetRegion]:
    """The regions a SharedImage target's version is published to: the target's own (or its definition's), with
    their replica counts and storage types, and the build's region (one replica) when they do not name it."""
    regions = [region for region, _ in target_regions(target, index=index, definition=definition)]
    if all(region_key(r.name) != region_key(build_location) for r in regions):
        regions.append(TargetRegion(name=build_location, storage_account_type=regions[0].storage_account_type))
    return regions


def _check_shallow(
    target: SharedImageDistributor, *, index: int, definition: ImageDefinition, build_location: str
) -> None:
    if target.replication_mode != "Shallow":
        return
    for region, field in target_regions(target, index=index, definition=definition):
        if region_key(region.name) != region_key(build_location):
            raise PermanentError(
                f"{field}: '{region.name}' is not the build's region {build_location}; a Shallow version is only "
                "where its source is (use replicationMode Full to replicate it)",
                kind="BadSharedImageDistribute",
            )
        if region.replica_count != 1:
            raise PermanentError(
                f"{field.removesuffix('.name')}.replicaCount: a Shallow version has one replica, "
                f"not {region.replica_count}",
                kind="BadSharedImageDistribute",
            )


def _check_each_region_once(target: SharedImageDistributor, *, index: int) -> None:
    seen: dict[str, str] = {}
    for region, field in target_regions(target, index=index):
        key = region_key(region.name)
        if key in seen:
            raise PermanentError(
                f"{field}: '{region.name}' is the region {seen[key]} names already; give each region once",
                kind="BadSharedImageDistribute",
            )
        seen[key] = field


async def check_targets(
    template: ImageTemplate,
    source: ResolvedSource,
    *,
    galleries: Galleries,
    check_region: RegionCheck | None = None,
) -> str:
    """Refuse, before a build makes anything, a target it could not write at its end; and say which security type
    the build VM must have for its image to go into every target.

    Args:
        template: the template whose ``properties.distribute`` is checked.
        source: the resolved source: a gallery target's definition must fit its OS type and generation.
        galleries: the cloud's lookups of galleries and image definitions.
        check_region: the cloud's check of a region name, where it has only some regions.

    Returns:
        ``TrustedLaunch`` when a target is a TrustedLaunch definition (``build_security``), else ``Standard``.
    """
    definitions: list[tuple[int, ImageDefinition]] = []
    for index, target in enumerate(template.properties.distribute):
        if isinstance(target, ManagedImageDistributor):
            managed_image_target(target, index=index)
            if check_region is not None:
                check_region(target.location, field=f"properties.distribute[{index}].location")
        elif isinstance(target, SharedImageDistributor):
            _, definition = await image_definition_for(
                target,
                index=index,
                os_type=source.os_type,
                hyper_v_generation=source.hyper_v_generation,
                galleries=galleries,
                source_security=source.security_type,
            )
            definitions.append((index, definition))
            _check_each_region_once(target, index=index)
            _check_shallow(target, index=index, definition=definition, build_location=template.location)
            if check_region is not None:
                for region, field in target_regions(target, index=index, definition=definition):
                    check_region(region.name, field=field)
    return build_security(template, definitions)


def build_security(template: ImageTemplate, definitions: list[tuple[int, ImageDefinition]]) -> str:
    """The build VM's security type. A TrustedLaunch definition takes only a Trusted Launch image, from the disks of
    a TrustedLaunch VM (secure boot and vTPM on); Azure makes no managed image of such a VM, and a
    TrustedLaunchSupported definition takes no disk snapshot (only VHDs, managed images and gallery versions:
    packer-plugin-azure#304). So with a TrustedLaunch definition among the targets the build VM is TrustedLaunch,
    every gallery target must be one, and nothing may need a managed image of the build: no ManagedImage target, no
    validator, no vmBoot or workload (each needs a VM made from the image). Otherwise Standard.

    Raises:
        PermanentError: ``BadSharedImageDistribute`` at the target or field that breaks this.
    """
    trusted = [index for index, d in definitions if d.security_type.lower() == TRUSTED_LAUNCH.lower()]
    if not trusted:
        return STANDARD
    why = (
        f"properties.distribute[{trusted[0]}] is a TrustedLaunch image definition, whose image is a TrustedLaunch VM's"
    )
    for index, definition in definitions:
        if index not in trusted:
            raise PermanentError(
                f"properties.distribute[{index}].galleryImageId: the definition is {definition.security_type}, "
                f"which takes no image of a TrustedLaunch VM's disks; {why}",
                kind="BadSharedImageDistribute",
            )
    props = template.properties
    needs: list[tuple[str, str]] = [
        (f"properties.distribute[{i}]", "a ManagedImage target")
        for i, t in enumerate(props.distribute)
        if isinstance(t, ManagedImageDistributor)
    ]
    if props.validation is not None and (props.validation.in_vm_validations or props.validation.source_validation_only):
        needs.append(("properties.validate", "validation"))
    if props.optimize is not None and props.optimize.vm_boot_enabled:
        needs.append(("properties.optimize.vmBoot", "vmBoot"))
    if (
        props.optimize is not None
        and props.optimize.workload is not None
        and props.optimize.workload.state == "Enabled"
    ):
        needs.append(("properties.optimize.workload", "a workload"))
    if needs:
        field, what = needs[0]
        raise PermanentError(
            f"{field}: {what} needs a managed image of the build, which Azure makes of no TrustedLaunch VM; {why}",
            kind="BadSharedImageDistribute",
        )
    return TRUSTED_LAUNCH
