"""The build the live suite makes on Azure, written once for Azure and for the ARM emulator, and how both find what
it left behind.

One small Linux image from a Gen2 Ubuntu platform image, built in one region, distributed into a gallery whose own
region is another (so the version is made in the build's region and replicated to the gallery's) and as a managed
image in a third (made from the captured snapshot's copy there). Leftovers are found as kiln finds its own: by the
listings of each type it makes in the staging group, and the staging group by its derived name; never through
``/resources``, which lags and, filtered by tag, returns no tags.
"""

from __future__ import annotations

from typing import Any

from activities.clouds.azure import AzureCloud
from workflows.models import BuildStatus

UBUNTU = {
    "type": "PlatformImage",
    "publisher": "Canonical",
    "offer": "0001-com-ubuntu-server-jammy",
    "sku": "22_04-lts-gen2",
    "version": "latest",
}


def live_template(
    *, location: str, gallery_image_id: str, gallery_region: str, image_id: str, image_location: str
) -> dict[str, Any]:
    """The template: built in ``location``, published to ``gallery_image_id`` (a Gen2 Linux definition in
    ``gallery_region``) and as the managed image ``image_id`` in ``image_location``."""
    return {
        "location": location,
        "properties": {
            "source": UBUNTU,
            "customize": [{"type": "Shell", "name": "hello", "inline": ["echo built by kiln | sudo tee /etc/kiln"]}],
            "distribute": [
                {
                    "type": "SharedImage",
                    "runOutputName": "gallery",
                    "galleryImageId": gallery_image_id,
                    "targetRegions": [{"name": gallery_region}],
                },
                {"type": "ManagedImage", "runOutputName": "managed", "imageId": image_id, "location": image_location},
            ],
        },
    }


async def leftovers(cloud: AzureCloud, status: BuildStatus, *, logs_kept: bool) -> list[str]:
    """The ids of what the build left that it should not have: its resources in its staging group (but for the
    staging account, when the logs are kept there), and the group itself when kiln made it and keeps no logs in
    it. The template gives no staging group, so kiln made it."""
    group_id = status.exact_staging_resource_group
    group = group_id.rsplit("/", 1)[-1]
    left = [
        r.id
        for r in await cloud.inventory.of_build(group, status.build_id)
        if not (logs_kept and r.type.lower() == "microsoft.storage/storageaccounts")
    ]
    if not logs_kept and await cloud.arm.resource.resource_groups.check_existence(group):
        left.append(group_id)
    return left
