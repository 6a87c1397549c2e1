"""`properties.source`: the image a build starts from, a marketplace image, a managed image or a gallery
image version, told apart by `type`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from workflows.template.base import AibModel
from workflows.template.formats import ImageVersionId, ManagedImageId, NonEmpty


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
