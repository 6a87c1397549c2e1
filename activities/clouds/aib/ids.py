"""ARM resource ids as AIB templates give them, and the platform image ids AIB reports.

AIB names every resource a template reads or writes by its ARM id (``imageId``, ``galleryImageId``,
``imageVersionId``, ``stagingResourceGroup``), and pins a platform image to Azure's own id for it
(``/Subscriptions/<sub>/Providers/Microsoft.Compute/Locations/<region>/Publishers/.../Versions/<version>``). ARM
compares ids without case, and region names without case or spaces (``West US 2`` is ``westus2``), so both clouds
read and compare them here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from activities.clouds.base import PermanentError

COMPUTE = "Microsoft.Compute"

_GROUP_ID = re.compile(r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<group>[^/]+)/?$", re.IGNORECASE)
_RESOURCE_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<group>[^/]+)/providers/(?P<ns>[^/]+)/(?P<rest>.+)$",
    re.IGNORECASE,
)
_PLATFORM_ID = re.compile(
    r"^/subscriptions/(?P<subscription>[^/]+)/providers/Microsoft\.Compute/locations/(?P<location>[^/]+)"
    r"/publishers/(?P<publisher>[^/]+)/artifacttypes/vmimage/offers/(?P<offer>[^/]+)/skus/(?P<sku>[^/]+)"
    r"/versions/(?P<version>[^/]+)$",
    re.IGNORECASE,
)


def region_key(name: str) -> str:
    """The name a region is compared by: ``East US`` and ``eastus`` are one region to ARM."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def resource_group_id(subscription: str, name: str) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{name}"


def parse_resource_group_id(resource_id: str) -> tuple[str, str] | None:
    """``(subscription, name)`` of a resource group id; None for any other string."""
    found = _GROUP_ID.match(resource_id)
    return (found["sub"], found["group"]) if found else None


@dataclass(frozen=True)
class ResourceId:
    """A resource id taken apart: where it lives, its provider namespace, and the type/name pairs after it."""

    subscription: str
    group: str
    namespace: str
    # type/name pairs after the namespace: ("galleries", "g", "images", "i", "versions", "1.0.0")
    path: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.path[-1]

    def is_a(self, namespace: str, *types: str) -> bool:
        """Whether this is a resource of ``namespace`` whose type path is ``types`` (compared without case)."""
        found = tuple(t.lower() for t in self.path[0::2])
        return self.namespace.lower() == namespace.lower() and found == tuple(t.lower() for t in types)


def parse_resource_id(resource_id: str) -> ResourceId | None:
    """The parts of a resource id in a resource group; None for anything else."""
    found = _RESOURCE_ID.match(resource_id)
    if found is None:
        return None
    path = tuple(found["rest"].strip("/").split("/"))
    if len(path) % 2:
        return None
    return ResourceId(found["sub"], found["group"], found["ns"], path)


def resource_id(resource_id: str, *, field: str) -> ResourceId:
    """The parts of a resource id a template gives in ``field``.

    Raises:
        PermanentError: ``BadResourceId`` when it is not an ARM resource id.
    """
    parsed = parse_resource_id(resource_id)
    if parsed is None:
        raise PermanentError(f"{field}: '{resource_id}' is not an ARM resource id", kind="BadResourceId")
    return parsed


def parse_managed_image_id(image_id: str) -> ResourceId | None:
    """A managed image's id (``.../providers/Microsoft.Compute/images/<name>``) taken apart; None otherwise."""
    parsed = parse_resource_id(image_id)
    return parsed if parsed is not None and parsed.is_a(COMPUTE, "images") else None


@dataclass(frozen=True)
class GalleryRef:
    """A gallery, an image definition in it, or a version of that definition, as an id names them."""

    subscription: str
    group: str
    gallery: str
    image: str | None
    version: str | None

    @property
    def gallery_id(self) -> str:
        return f"{resource_group_id(self.subscription, self.group)}/providers/{COMPUTE}/galleries/{self.gallery}"

    @property
    def image_id(self) -> str:
        return f"{self.gallery_id}/images/{self.image}"

    def version_id(self, version: str) -> str:
        return f"{self.image_id}/versions/{version}"


def parse_gallery_id(resource_id: str) -> GalleryRef | None:
    """A gallery, image definition or image version id taken apart; None for any other id."""
    parsed = parse_resource_id(resource_id)
    if parsed is None:
        return None
    for types in (("galleries",), ("galleries", "images"), ("galleries", "images", "versions")):
        if parsed.is_a(COMPUTE, *types):
            names = [*parsed.path[1::2], None, None]
            return GalleryRef(parsed.subscription, parsed.group, names[0], names[1], names[2])
    return None


@dataclass(frozen=True)
class PlatformImageRef:
    """A marketplace image version, as its platform image id names it."""

    subscription: str
    location: str
    publisher: str
    offer: str
    sku: str
    version: str


def platform_image_id(subscription: str, location: str, publisher: str, offer: str, sku: str, version: str) -> str:
    """Azure's id of a platform image version, the shape AIB pins a ``PlatformImage`` source to."""
    return (
        f"/Subscriptions/{subscription}/Providers/{COMPUTE}/Locations/{location}/Publishers/{publisher}"
        f"/ArtifactTypes/VMImage/Offers/{offer}/Skus/{sku}/Versions/{version}"
    )


def parse_platform_image_id(image_id: str) -> PlatformImageRef | None:
    """The parts of a platform image id (in any case); None for any other id."""
    found = _PLATFORM_ID.match(image_id)
    return PlatformImageRef(**found.groupdict()) if found else None
