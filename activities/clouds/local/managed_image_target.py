"""A ManagedImage distribution target on the local cloud: the image's VHD as a page blob in its region's account,
and a record at the image's id that makes it a managed image (a later build's ManagedImage source).

The blob's name carries the build, so a build that makes the image again at the same id writes a blob of its own,
and the one it replaced goes only once the new image stands.
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
from activities.clouds.local.outputs import (
    CREATING,
    SUCCEEDED,
    LocalImage,
    captured_vhd,
    image_vhd,
    output_data,
    output_tags,
)
from activities.clouds.local.records import record_key
from workflows.models import DistributeRequest, RunOutput
from workflows.template import ManagedImageDistributor

KIND_MANAGED_IMAGE = "managedImage"
IMAGES_CONTAINER = "images"


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
        """Upload the image's blob, then record the image: it exists once it is whole."""
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
        name = f"{ref.subscription}/{ref.group}/{ref.name}-{_short_id(build.build_id)}.vhd".lower()
        blob = accounts.blob(account, IMAGES_CONTAINER, name)
        await accounts.record_blob(
            blob.url,
            build.build_id,
            tags=output_tags(request),
            data=output_data(request, state=CREATING, parent=record_key(target.image_id)),
        )
        await vhd_pages.upload(
            captured_vhd(request),
            [blob],
            build_id=build.build_id,
            resume_offset=int(resume.get("offset", 0)),
            progress=lambda offset: progress({"offset": offset}),
        )
        await accounts.db(store.update, blob.url, {"state": SUCCEEDED})
        await accounts.db(
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
                blobUrl=blob.url,
                osType=request.source.os_type,
                hyperVGeneration=request.image.hyper_v_generation,
                sizeBytes=request.image.size_bytes,
            ),
        )
        # The image was made again at the same id: what it replaced goes.
        if previous is not None and previous.data.get("blobUrl") not in (None, blob.url):
            await accounts.delete_blob(previous.data["blobUrl"])
            await accounts.db(store.forget, previous.data["blobUrl"])
        return RunOutput(run_output_name=target.run_output_name, type="ManagedImage", artifact_id=target.image_id)

    async def locate(self, image_id: str) -> LocalImage:
        """The VHD of a finished local managed image, downloaded once into the image cache.

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
        path = await image_vhd(accounts, record.data["blobUrl"])
        # A managed image has no version; the build that made it pins what it holds.
        return LocalImage(path, record.build_id or "", record.data["hyperVGeneration"])
