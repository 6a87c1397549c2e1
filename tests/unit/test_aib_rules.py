"""AIB's rules as both clouds apply them (activities/clouds/aib): names, ids, tags, versions, target checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.clouds.aib.ids import (
    parse_gallery_id,
    parse_managed_image_id,
    parse_platform_image_id,
    platform_image_id,
    region_key,
)
from activities.clouds.aib.names import build_guid, staged_blob_name, staging_group, staging_group_name
from activities.clouds.aib.tags import TAG_BUILD_ID, TAG_ROLE, build_tags, kiln_tags
from activities.clouds.aib.targets import ImageDefinition, check_targets, target_regions
from activities.clouds.aib.versions import choose_version, version_key
from activities.clouds.aib.vm_sizes import data_disk_without_size
from activities.clouds.base import PermanentError
from activities.source import SourceActivities
from tests.fixtures.recording_cloud import RecordingCloud
from workflows.models import Artifact, BuildContext, ResolvedSource, ResolveSourceRequest
from workflows.template import SharedImageDistributor, TargetRegion, Versioning, parse_template

SUB = "11111111-2222-3333-4444-555555555555"
COMPUTE = f"/subscriptions/{SUB}/resourceGroups/images/providers/Microsoft.Compute"
DEFINITION = f"{COMPUTE}/galleries/g/images/debian"


def build(**overrides: object) -> BuildContext:
    values: dict = {
        "build_id": "golden-1a2b3c4d",
        "template_name": "golden",
        "location": "eastus",
        "cloud": "local",
        "destination_resource_group": "images",
    }
    return BuildContext(**{**values, **overrides})


def test_the_staging_group_is_named_as_aib_names_it_or_the_template_gives_it() -> None:
    assert staging_group_name(build()) == f"IT_images_golden_{build_guid('golden-1a2b3c4d')}"
    given = staging_group(build(staging_resource_group=f"/subscriptions/{SUB}/resourceGroups/mine"), subscription=SUB)
    assert (given.name, given.user_given, given.id) == ("mine", True, f"/subscriptions/{SUB}/resourceGroups/mine")
    elsewhere = build(staging_resource_group="/subscriptions/other/resourceGroups/mine")
    with pytest.raises(PermanentError, match="is not in subscription") as caught:
        staging_group(elsewhere, subscription=SUB)
    assert caught.value.type == "BadStagingResourceGroup"
    assert staging_group(elsewhere, subscription=SUB, any_subscription=True).subscription == "other"
    with pytest.raises(PermanentError, match="is not a resource group id"):
        staging_group(build(staging_resource_group="mine"), subscription=SUB)


def test_a_staged_blob_is_named_by_its_field_and_content() -> None:
    artifact = Artifact(source_uri="https://example.invalid/a.sh", field="properties.customize[0].scriptUri")
    name = staged_blob_name(artifact, b"echo hi\n")
    assert name.startswith("properties.customize-0-.scriptUri-") and name == staged_blob_name(artifact, b"echo hi\n")
    assert name != staged_blob_name(artifact, b"echo bye\n")


def test_one_build_id_key_that_user_tags_cannot_forge() -> None:
    tags = build_tags(build(managed_resource_tags={"team": "x", TAG_BUILD_ID: "forged"}), role="temporary")
    assert tags[TAG_BUILD_ID] == "golden-1a2b3c4d" and tags["team"] == "x" and tags[TAG_ROLE] == "temporary"
    assert tags["imageTemplateName"] == "golden" and tags["imageTemplateResourceGroupName"] == "images"
    assert kiln_tags("b", role="output")[TAG_BUILD_ID] == "b" and TAG_BUILD_ID == "kilnBuildId"


def test_ids_are_read_without_case_and_regions_without_spaces() -> None:
    ref = parse_gallery_id(f"{DEFINITION.upper()}/VERSIONS/1.0.0")
    assert ref is not None and (ref.gallery, ref.image, ref.version) == ("G", "DEBIAN", "1.0.0")
    assert parse_gallery_id(f"{COMPUTE}/images/x") is None and parse_managed_image_id(f"{COMPUTE}/images/x")
    platform = platform_image_id(SUB, "eastus", "Debian", "debian-12", "12-gen2", "0.20260101.1")
    assert platform.startswith(f"/Subscriptions/{SUB}/Providers/Microsoft.Compute/Locations/eastus/Publishers/")
    parsed = parse_platform_image_id(platform.lower())
    assert parsed is not None and (parsed.offer, parsed.version) == ("debian-12", "0.20260101.1")
    assert region_key("West US 2") == region_key("westus2") == "westus2"


def test_an_empty_data_disk_needs_a_size() -> None:
    assert data_disk_without_size([]) is None and data_disk_without_size([1, 32]) is None
    needs = "an empty data disk needs a size of 1 GB or more"
    assert data_disk_without_size([8, 0]) == f"properties.additionalDataDisks[1].sizeGB: {needs}"
    assert data_disk_without_size([None, 8]) == f"properties.additionalDataDisks[0].sizeGB: {needs}"


async def test_a_data_disk_without_a_size_is_refused_before_the_cloud_is_asked(tmp_path: Path) -> None:
    """The rule is the resolve step's, for every cloud, before the cloud resolves (and so makes) anything."""
    cloud = RecordingCloud(tmp_path / "cloud.db")
    cloud.inject("resolve_source", "fatal")  # a cloud asked first would fail with its own error
    source = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12-gen2", "version": "1"}
    properties = {"source": source, "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}
    template = parse_template({"location": "eastus", "properties": {**properties, "additionalDataDisks": [{}]}})
    resolve = SourceActivities(cloud, cloud.guests()).resolve_source
    with pytest.raises(PermanentError) as refused:
        await ActivityEnvironment().run(resolve, ResolveSourceRequest(build=build(), template=template))
    assert refused.value.type == "BadDataDisk"
    assert refused.value.message.startswith("properties.additionalDataDisks[0].sizeGB: an empty data disk needs")
    assert cloud.faults_taken("resolve_source") == 0


def shared(definition: str = DEFINITION, **kwargs: object) -> SharedImageDistributor:
    return SharedImageDistributor(
        type="SharedImage",
        run_output_name="sig",
        gallery_image_id=definition,
        target_regions=[TargetRegion(name="eastus")],
        **kwargs,
    )


def test_the_version_a_gallery_target_writes() -> None:
    existing = ["0.1.1", "0.1.2", "1.1.0", "1.2.0", "2.0.0", "2.1.0"]
    ref = parse_gallery_id(DEFINITION)
    assert ref is not None

    def choose(target: SharedImageDistributor, source_version: str = "12.20240101.3") -> str:
        pinned = parse_gallery_id(target.gallery_image_id)
        assert pinned is not None
        return choose_version(target, pinned, index=0, source_version=source_version, existing=existing)

    assert choose(shared()) == "2.1.1"
    assert choose(shared(versioning=Versioning(scheme="Latest", major=1))) == "1.2.1"
    assert choose(shared(versioning=Versioning(scheme="Source"))) == "12.20240101.3"
    assert choose(shared(f"{DEFINITION}/versions/3.0.0")) == "3.0.0"
    with pytest.raises(PermanentError, match=r"distribute\[0\]\.galleryImageId: version 1\.1\.0 of .* already exists"):
        choose(shared(f"{DEFINITION}/versions/1.1.0"))
    with pytest.raises(PermanentError, match=r"versioning\.scheme: '20240101' is not a gallery image version"):
        choose(shared(versioning=Versioning(scheme="Source")), "20240101")
    assert sorted(["1.10.0", "1.9.0", "latest"], key=version_key) == ["latest", "1.9.0", "1.10.0"]


class Galleries:
    """One gallery with one Linux V2 image definition."""

    async def gallery_exists(self, ref: object) -> bool:
        return getattr(ref, "gallery", None) == "g"

    async def image_definition(self, ref: object) -> ImageDefinition | None:
        if getattr(ref, "image", None) != "debian":
            return None
        return ImageDefinition(os_type="Linux", hyper_v_generation="V2", location="eastus")

    def how_to_make(self, ref: object) -> str:
        return "make them"


SOURCE = ResolvedSource(image_id="x", exact_version="1", os_type="Linux", hyper_v_generation="V2")


def with_target(target: dict) -> object:
    shared = {"type": "SharedImage", "targetRegions": [{"name": "eastus"}]} if "type" not in target else {}
    target = {"runOutputName": "out", **shared, **target}
    source = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12-gen2", "version": "1"}
    return parse_template({"location": "eastus", "properties": {"source": source, "distribute": [target]}})


def only_eastus(region: str, *, field: str) -> None:
    if region != "eastus":
        raise PermanentError(f"{field}: {region} is not a region here", kind="LocationNotAvailable")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        # A <placeholder> passes the template's validation; the cloud refuses it.
        ({"type": "ManagedImage", "imageId": "<image id>", "location": "eastus"}, "not a managed image id"),
        ({"type": "ManagedImage", "imageId": f"{COMPUTE}/images/i", "location": "mars"}, r"\[0\]\.location: mars"),
        ({"galleryImageId": "<definition id>"}, "not an image definition id"),
        ({"galleryImageId": f"{COMPUTE}/galleries/none/images/debian"}, "the gallery .* does not exist.*make them"),
        ({"galleryImageId": f"{COMPUTE}/galleries/g/images/none"}, "image definition .* does not exist.*make them"),
        ({"galleryImageId": DEFINITION, "targetRegions": [{"name": "mars"}]}, r"targetRegions\[0\]\.name: mars"),
    ],
)
async def test_targets_that_cannot_be_written_are_refused_before_the_build(target: dict, message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        await check_targets(with_target(target), SOURCE, galleries=Galleries(), check_region=only_eastus)


def test_a_gallery_target_without_regions_replicates_to_its_image_definition_s_region() -> None:
    target = with_target({"galleryImageId": DEFINITION, "targetRegions": []}).properties.distribute[0]  # type: ignore[attr-defined]
    home = ImageDefinition(os_type="Linux", hyper_v_generation="V2", location="westus3")
    assert [(r.name, field) for r, field in target_regions(target, index=0, definition=home)] == [
        ("westus3", "properties.distribute[0].galleryImageId")
    ]
    listed = with_target({"galleryImageId": DEFINITION}).properties.distribute[0]  # type: ignore[attr-defined]
    assert [r.name for r, _ in target_regions(listed, index=0, definition=home)] == ["eastus"]


async def test_a_gallery_target_must_fit_the_image() -> None:
    template = with_target({"galleryImageId": DEFINITION})
    await check_targets(template, SOURCE, galleries=Galleries(), check_region=only_eastus)
    gen1 = SOURCE.model_copy(update={"hyper_v_generation": "V1"})
    with pytest.raises(PermanentError, match="generation V1, but the image definition .* is V2"):
        await check_targets(template, gen1, galleries=Galleries())


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"targetRegions": [{"name": "westus2"}]}, r"targetRegions\[0\]\.name: 'westus2' is not the build's region"),
        ({"targetRegions": [{"name": "eastus", "replicaCount": 2}]}, r"targetRegions\[0\]\.replicaCount: .* one"),
        (
            {"replicationRegions": ["eastus", "westus2"], "targetRegions": None},
            r"replicationRegions\[1\]\.name: 'westus2'",
        ),
    ],
)
async def test_a_shallow_gallery_target_is_only_in_the_build_s_region_with_one_replica(
    target: dict, message: str
) -> None:
    shallow = {"galleryImageId": DEFINITION, "replicationMode": "Shallow", **target}
    with pytest.raises(PermanentError, match=message):
        await check_targets(with_target(shallow), SOURCE, galleries=Galleries())
    full = {**shallow, "replicationMode": "Full"}
    await check_targets(with_target(full), SOURCE, galleries=Galleries())


async def test_a_shallow_gallery_target_in_the_build_s_region_is_taken() -> None:
    for target in ({"targetRegions": [{"name": "East US"}]}, {"targetRegions": None}):
        shallow = {"galleryImageId": DEFINITION, "replicationMode": "Shallow", **target}
        await check_targets(with_target(shallow), SOURCE, galleries=Galleries())


class SecureGalleries(Galleries):
    """Beside 'debian' (TrustedLaunchSupported), 'trusted', a TrustedLaunch definition."""

    async def image_definition(self, ref: object) -> ImageDefinition | None:
        security = {"debian": "TrustedLaunchSupported", "trusted": "TrustedLaunch"}.get(getattr(ref, "image", ""))
        if security is None:
            return None
        return ImageDefinition(os_type="Linux", hyper_v_generation="V2", location="eastus", security_type=security)


TRUSTED_SOURCE = SOURCE.model_copy(update={"security_type": "TrustedLaunchSupported"})


def trusted_template(**properties: object) -> object:
    source = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12-gen2", "version": "1"}
    target = {"type": "SharedImage", "runOutputName": "out", "galleryImageId": f"{COMPUTE}/galleries/g/images/trusted"}
    body = {"location": "eastus", "properties": {"source": source, "distribute": [target], **properties}}
    return parse_template(body)


async def test_a_trusted_launch_definition_asks_for_a_trusted_launch_build_vm() -> None:
    assert await check_targets(trusted_template(), TRUSTED_SOURCE, galleries=SecureGalleries()) == "TrustedLaunch"
    supported = with_target({"galleryImageId": DEFINITION})
    assert await check_targets(supported, TRUSTED_SOURCE, galleries=SecureGalleries()) == "Standard"
    with pytest.raises(PermanentError, match="does not match the source's, Standard"):
        await check_targets(trusted_template(), SOURCE, galleries=SecureGalleries())


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({"validate": {"inVMValidations": [{"type": "Shell", "inline": ["true"]}]}}, "properties.validate"),
        ({"optimize": {"vmBoot": {"state": "Enabled"}}}, "properties.optimize.vmBoot"),
        (
            {"optimize": {"workload": {"state": "Enabled", "scriptUri": "https://x/w.sh"}}},
            "properties.optimize.workload",
        ),
    ],
)
async def test_what_needs_a_managed_image_cannot_go_with_a_trusted_launch_definition(
    properties: dict, field: str
) -> None:
    with pytest.raises(PermanentError, match=rf": {field}: .* needs a managed image of the build"):
        await check_targets(trusted_template(**properties), TRUSTED_SOURCE, galleries=SecureGalleries())


async def test_a_trusted_launch_definition_cannot_share_a_build_with_a_managed_image_or_a_supported_one() -> None:
    trusted = trusted_template().properties.distribute[0]  # type: ignore[attr-defined]
    managed = {"type": "ManagedImage", "runOutputName": "m", "imageId": f"{COMPUTE}/images/i", "location": "eastus"}
    supported = {"type": "SharedImage", "runOutputName": "s", "galleryImageId": DEFINITION}
    for other, message in (
        (managed, r": properties\.distribute\[1\]: a ManagedImage target needs a managed image"),
        (supported, r"distribute\[1\]\.galleryImageId: the definition is TrustedLaunchSupported"),
    ):
        template = trusted_template(distribute=[trusted.model_dump(by_alias=True, exclude_none=True), other])
        with pytest.raises(PermanentError, match=message):
            await check_targets(template, TRUSTED_SOURCE, galleries=SecureGalleries())
