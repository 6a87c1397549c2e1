"""Galleries and image definitions looked up on ARM, for AIB's rules on SharedImage targets (``aib.targets``)."""

from __future__ import annotations

from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from activities.clouds.aib.ids import GalleryRef
from activities.clouds.aib.targets import STANDARD, ImageDefinition
from activities.clouds.azure.clients import ArmClients
from activities.clouds.azure.errors import arm_call


def security_type(features: list[Any] | None) -> str:
    """The ``SecurityType`` among an image's or image definition's features; Standard when it has none."""
    return next((f.value for f in features or [] if (f.name or "").lower() == "securitytype" and f.value), STANDARD)


class AzureGalleries:
    """The ``Galleries`` of the subscription kiln builds in, where its clients look."""

    def __init__(self, arm: ArmClients) -> None:
        self._arm = arm

    async def gallery_exists(self, ref: GalleryRef) -> bool:
        async with arm_call(f"gallery {ref.gallery_id}", needs="Microsoft.Compute/galleries/read"):
            try:
                await self._arm.compute.galleries.get(ref.group, ref.gallery)
            except ResourceNotFoundError:
                return False
        return True

    async def image_definition(self, ref: GalleryRef) -> ImageDefinition | None:
        assert ref.image is not None
        async with arm_call(f"image definition {ref.image_id}", needs="Microsoft.Compute/galleries/images/read"):
            try:
                found = await self._arm.compute.gallery_images.get(ref.group, ref.gallery, ref.image)
            except ResourceNotFoundError:
                return None
        return ImageDefinition(
            os_type="Windows" if found.os_type == "Windows" else "Linux",
            hyper_v_generation="V2" if found.hyper_v_generation == "V2" else "V1",
            location=found.location,
            security_type=security_type(found.features),
        )

    def how_to_make(self, ref: GalleryRef) -> str:
        return "`az sig create` and `az sig image-definition create` make them"
