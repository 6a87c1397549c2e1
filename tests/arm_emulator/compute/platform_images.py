"""The marketplace: `ArmEmulator.platform_images` is the catalogue that the VirtualMachineImages list and get
endpoints serve (see `PlatformImage`); a VM created from a catalogue image that has a purchase plan must carry that
plan, as in ARM (see vm.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..protocol import ArmError, Request, Response, method_not_allowed, region_name
from ..provider import Route

if TYPE_CHECKING:
    from ..server import ArmEmulator


@dataclass(frozen=True)
class PlatformImage:
    """One marketplace SKU (publisher/offer/sku) and its versions, as VirtualMachineImages serves it.

    `plan` is the purchase plan (`{"name", "product", "publisher"}`) a VM made from it must name;
    `locations` limits the regions that offer it (None: every region); `features` are its image features by
    name, such as `{"SecurityType": "TrustedLaunchSupported"}`.
    """

    versions: tuple[str, ...] | list[str]
    os_type: str = "Linux"
    hyper_v_generation: str = "V1"
    plan: dict[str, str] | None = None
    architecture: str = "x64"
    locations: tuple[str, ...] | None = None
    features: dict[str, str] | None = None

    def offered_in(self, location: str) -> bool:
        return self.locations is None or region_name(location) in {region_name(loc) for loc in self.locations}


def catalogue_entry(
    catalogue: dict[tuple[str, str, str], PlatformImage], publisher: str, offer: str, sku: str
) -> PlatformImage | None:
    """The catalogue's image for a SKU, its names matched case-insensitively as ARM matches them."""
    wanted = (publisher.lower(), offer.lower(), sku.lower())
    return next(
        (image for key, image in list(catalogue.items()) if tuple(k.lower() for k in key) == wanted),
        None,
    )


def _platform_image(
    arm: ArmEmulator,
    req: Request,
    sub: str,
    location: str,
    publisher: str,
    offer: str,
    sku: str,
    version: str | None,
) -> Response:
    """VirtualMachineImages list (a bare JSON array, ascending by version unless $orderby says
    otherwise, $top honoured) and get. The ids use ARM's capitalised form and echo the request's
    publisher/offer/sku; an unknown SKU, version or region is 404 NotFound, as ARM answers it."""
    location, publisher, offer, sku = (unquote(part) for part in (location, publisher, offer, sku))
    version = unquote(version) if version is not None else None
    if req.method != "GET":
        raise method_not_allowed(req)
    image = catalogue_entry(arm.platform_images, publisher, offer, sku)
    region = region_name(location)
    if image is None or not image.offered_in(region) or (version is not None and version not in image.versions):
        raise ArmError(404, "NotFound", "Artifact: VMImage was not found.")
    base = (
        f"/Subscriptions/{sub}/Providers/Microsoft.Compute/Locations/{region}/Publishers/{publisher}"
        f"/ArtifactTypes/VMImage/Offers/{offer}/Skus/{sku}/Versions"
    )
    if version is not None:
        return Response(200, _image_version(image, base, region, version, with_properties=True))
    order = re.fullmatch(r"\s*name(?:\s+(asc|desc))?\s*", req.query.get("$orderby", "name"), re.IGNORECASE)
    if order is None:
        raise ArmError(400, "InvalidParameter", f"$orderby '{req.query['$orderby']}' is not supported.")
    names = sorted(image.versions, key=_version_key, reverse=(order.group(1) or "").lower() == "desc")
    top = req.query.get("$top")
    if top is not None:
        if not top.isdigit():
            raise ArmError(400, "InvalidParameter", f"$top '{top}' is not a non-negative integer.")
        names = names[: int(top)]
    expand = req.query.get("$expand", "").lower() == "properties"
    return Response(200, [_image_version(image, base, region, v, with_properties=expand) for v in names])


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def _image_version(
    image: PlatformImage, base: str, region: str, version: str, *, with_properties: bool
) -> dict[str, Any]:
    """A VirtualMachineImage: the list shows name, location and id; get adds its properties."""
    out: dict[str, Any] = {"location": region, "name": version, "id": f"{base}/{version}"}
    if with_properties:
        out["properties"] = {
            "osDiskImage": {"operatingSystem": image.os_type},
            "dataDiskImages": [],
            "automaticOSUpgradeProperties": {"automaticOSUpgradeSupported": False},
            "hyperVGeneration": image.hyper_v_generation,
            "architecture": image.architecture,
            "imageDeprecationStatus": {"imageState": "Active"},
            **({"plan": dict(image.plan)} if image.plan else {}),
            **({"features": [{"name": k, "value": v} for k, v in image.features.items()]} if image.features else {}),
        }
    return out


ROUTES = (
    Route(
        r"providers/microsoft\.compute/locations/([^/]+)/publishers/([^/]+)/artifacttypes/vmimage"
        r"/offers/([^/]+)/skus/([^/]+)/versions(?:/([^/]+))?",
        _platform_image,
    ),
)
