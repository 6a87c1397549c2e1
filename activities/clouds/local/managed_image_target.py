"""A ManagedImage distribution target on the local cloud: the image's VHD as a page blob in its region's account
(and each of its data disks' beside it), and a record at the image's id that makes it a managed image (a later
build's ManagedImage source), its data disks at their LUNs as Azure's image has them.

The blobs' names carry the build, so a build that makes the image again at the same id writes blobs of its own,
and the ones it replaced go only once the new image stands.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from activities.clouds.aib.ids import region_key
from activities.clouds.aib.targets import managed_image_target
from activities.clouds.base import PermanentError, Progress
from activities.clouds.local import azurite, vhd_pages
from activities.clouds.local.accounts import LocalAccounts
from activities.clouds.local.capture import vhd_file
from activities.clouds.local.outputs import (
    CREATING,
    SUCCEEDED,
    LocalImage,
    captured_disks,
    image_vhd,
    output_data,
    output_tags,
)
from activities.clouds.local.records import record_key
from workflows.models import DistributeRequest, RunOutput
from workflows.template import ManagedImageDistributor

KIND_MANAGED_IMAGE = "managedImage"
IMAGES_CONTAINER = "images"


def image_blobs(data: dict[str, Any]) -> list[str]:
    """The blobs of a managed image's record: its OS disk's, then each data disk's."""
    return [data["blobUrl"], *(disk["blobUrl"] for disk in data.get("dataDiskImages", []))]


def _short_id(build_id: str) -> str:
    """Eight characters that tell builds apart: a uuid's first eight, else a hash of the id."""
    hexdigits = build_id.replace("-", "").lower()
    if re.fullmatch(r"[0-9a-f]{32}", hexdigits):
        return hexdigits[:8]
    return hashlib.sha256(build_id.encode()).hexdigest()[:8]


class ManagedImageTarget:
    """Writes ManagedImage targets, and finds the images they made for later builds' ManagedImage sources."""

    def __init__(self, accounts: LocalAccounts) -> None:
        self._accounts = accounts

    async def distribute(
        self, request: DistributeRequest, target: ManagedImageDistributor, resume: dict[str, Any], progress: Progress
    ) -> RunOutput:
        """Upload the image's blobs, then record the image: it exists once it is whole."""
        accounts, store, build = self._accounts, self._accounts.store, request.build
        field = f"properties.distribute[{request.index}]"
        ref = managed_image_target(target, index=request.index)
        account = azurite.account_for_region(target.location, field=f"{field}.location")
        region = region_key(target.location)
        previous = await accounts.db(store.get, record_key(target.image_id))
        if previous is not None and previous.build_id != build.build_id and previous.data.get("location") != region:
            raise PermanentError(
                f"{field}.location: the image {target.image_id} exists in {previous.data.get('location')}, "
                f"not {target.location}",
                kind="BadDistributeType",
            )
        await accounts.ensure_container(account, IMAGES_CONTAINER)
        name = f"{ref.subscription}/{ref.group}/{ref.name}-{_short_id(build.build_id)}".lower()
        disks = captured_disks(request)
        names = [f"{name}.vhd", *(f"{name}-lun{lun}.vhd" for lun in range(len(disks) - 1))]
        blobs = [accounts.blob(account, IMAGES_CONTAINER, blob_name) for blob_name in names]
        for blob in blobs:
            await accounts.record_blob(
                blob.url,
                build.build_id,
                tags=output_tags(request),
                data=output_data(request, state=CREATING, parent=record_key(target.image_id)),
            )
        await vhd_pages.upload_disks(
            [(disk, [blob]) for disk, blob in zip(disks, blobs, strict=True)],
            build_id=build.build_id,
            resume=resume,
            progress=lambda disk, offset: progress({"disk": disk, "offset": offset}),
        )
        for blob in blobs:
            await accounts.db(store.update, blob.url, {"state": SUCCEEDED})
        data_disks = [
            {"lun": lun, "blobUrl": blob.url, "sizeBytes": vhd_file(disk).size_bytes}
            for lun, (disk, blob) in enumerate(zip(disks[1:], blobs[1:], strict=True))
        ]
        record = await accounts.db(
            store.record,
            record_key(target.image_id),
            kind=KIND_MANAGED_IMAGE,
            build_id=build.build_id,
            tags=output_tags(request),
            data=output_data(
                request,
                id=target.image_id,
                state=SUCCEEDED,
                location=region,
                blobUrl=blobs[0].url,
                dataDiskImages=data_disks,
                osType=request.source.os_type,
                hyperVGeneration=request.image.hyper_v_generation,
                sizeBytes=request.image.size_bytes,
            ),
        )
        # The image was made again at the same id: what it replaced goes.
        if previous is not None and "blobUrl" in previous.data:
            for url in set(image_blobs(previous.data)) - set(image_blobs(record.data)):
                await accounts.delete_blob(url)
                await accounts.db(store.forget, url)
        return RunOutput(run_output_name=target.run_output_name, type="ManagedImage", artifact_id=target.image_id)

    async def locate(self, image_id: str) -> LocalImage:
        """The VHDs of a finished local managed image (its OS disk's and its data disks'), downloaded once into the
        image cache.

        Raises:
            PermanentError: ``BadManagedImageSource`` when there is no such image.
        """
        accounts = self._accounts
        record = await accounts.db(accounts.store.get, record_key(image_id))
        if record is None or record.data.get("state") != SUCCEEDED:
            known = [r.data.get("id", r.id) for r in await accounts.db(accounts.store.list, kind=KIND_MANAGED_IMAGE)]
            raise PermanentError(
                f"properties.source.imageId: there is no local managed image {image_id}; local managed images: "
                f"{', '.join(known) or 'none'}",
                kind="BadManagedImageSource",
            )
        path, *data_disks = [await image_vhd(accounts, url) for url in image_blobs(record.data)]
        # A managed image has no version; the build that made it pins what it holds.
        return LocalImage(path, record.build_id or "", record.data["hyperVGeneration"], data_disks=tuple(data_disks))
