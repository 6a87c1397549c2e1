"""`properties.distribute`: where a built image goes, a managed image, an Azure Compute Gallery image
version or a VHD, told apart by `type`, each named by its own runOutputName.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field
from pydantic_core import InitErrorDetails

from workflows.template.api_versions import RequiredBefore, Since
from workflows.template.base import AibModel, broken_rule, given, input_field
from workflows.template.formats import GalleryImageId, ManagedImageId, NonEmpty, ResourceName

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
        if input_field(data, "scheme") == "Source" and input_field(data, "major") not in (None, -1):
            yield broken_rule("'major' applies only to scheme 'Latest'.", data, "major")


class ManagedImageDistributor(AibModel):
    """Writes a managed image; its resource group must exist."""

    type: Literal["ManagedImage"]
    run_output_name: ResourceName
    artifact_tags: dict[str, str] = {}
    image_id: ManagedImageId
    location: NonEmpty


class SharedImageDistributor(AibModel):
    """Writes an Azure Compute Gallery image version; the gallery and image definition must exist.

    With neither `targetRegions` nor `replicationRegions` (allowed from API 2022-07-01), the version is
    replicated to the image definition's own region only.
    """

    type: Literal["SharedImage"]
    run_output_name: ResourceName
    artifact_tags: dict[str, str] = {}
    gallery_image_id: GalleryImageId
    replication_regions: Annotated[list[str] | None, RequiredBefore("2022-07-01")] = Field(
        None, description="Deprecated: use targetRegions."
    )
    target_regions: Annotated[list[TargetRegion] | None, Since("2022-07-01")] = Field(
        None, description="Regions to replicate to; none means the image definition's region."
    )
    storage_account_type: StorageAccountType | None = Field(
        None, description="Deprecated: only with replicationRegions; use targetRegions[].storageAccountType."
    )
    exclude_from_latest: bool = False
    versioning: Annotated[Versioning | None, Since("2022-07-01")] = None
    replication_mode: Annotated[Literal["Full", "Shallow"] | None, Since("2025-10-01")] = Field(
        None, description="Full (the default) or Shallow replication of the gallery image version."
    )

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        legacy, targets = given(input_field(data, "replicationRegions")), given(input_field(data, "targetRegions"))
        if legacy and targets:
            yield broken_rule(
                "'replicationRegions' and 'targetRegions' cannot both be given; use 'targetRegions' "
                "('replicationRegions' is deprecated).",
                data,
            )
        if input_field(data, "storageAccountType") is not None and not legacy:
            yield broken_rule(
                "'storageAccountType' can be given only with 'replicationRegions'; "
                "with 'targetRegions' set 'storageAccountType' on each region.",
                data,
                "storageAccountType",
            )

    def regions(self) -> list[TargetRegion]:
        """targetRegions, or the legacy replicationRegions with storageAccountType ([] when neither is given: the
        image definition's region, which only the cloud knows)."""
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
    uri: Annotated[str | None, Since("2022-07-01")] = None


Distributor = Annotated[ManagedImageDistributor | SharedImageDistributor | VhdDistributor, Field(discriminator="type")]
