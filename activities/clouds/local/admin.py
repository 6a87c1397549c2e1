"""The local cloud's admin surface, for the kiln CLI: galleries and image definitions, every resource the local
cloud has recorded, and build logs.

A SharedImage target needs its gallery and image definition to exist first, as on Azure, so ``kiln gallery
create`` makes them here. Galleries and the resource list are records only, so none of this needs a worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob.aio import BlobClient

from activities.clouds.aib.ids import parse_gallery_id, region_key
from activities.clouds.aib.tags import CREATED_BY, ROLE_TEMPORARY, TAG_CREATED_BY
from activities.clouds.aib.versions import version_key
from activities.clouds.base import PermanentError
from activities.clouds.local import azurite
from activities.clouds.local.accounts import split_blob_url
from activities.clouds.local.records import ResourceRecord, ResourceStore, record_key

KIND_GALLERY = "gallery"
KIND_IMAGE_DEFINITION = "galleryImageDefinition"
KIND_IMAGE_VERSION = "galleryImageVersion"


class LocalAdmin:
    """Make and list the local cloud's galleries and image definitions, and list its resources."""

    def __init__(self, store: ResourceStore | None = None) -> None:
        self.store = store or ResourceStore()

    async def create_gallery(self, gallery_id: str, *, location: str = azurite.REGIONS[0]) -> ResourceRecord:
        """Make a local gallery, or return the one that exists.

        Raises:
            PermanentError: ``BadGalleryId`` for an id that is not a gallery's, ``LocationNotAvailable`` for a
                region the local cloud does not have.
        """
        ref = parse_gallery_id(gallery_id)
        if ref is None or ref.image is not None:
            raise PermanentError(
                f"'{gallery_id}' is not a gallery id "
                "(/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/galleries/<name>)",
                kind="BadGalleryId",
            )
        azurite.account_for_region(location, field="location")
        return await asyncio.to_thread(
            self.store.claim,
            record_key(gallery_id),
            kind=KIND_GALLERY,
            build_id=None,
            tags={TAG_CREATED_BY: CREATED_BY},
            data={"id": gallery_id, "location": region_key(location)},
        )

    async def create_image_definition(
        self,
        image_definition_id: str,
        *,
        os_type: str = "Linux",
        hyper_v_generation: str = "V2",
        publisher: str,
        offer: str,
        sku: str,
    ) -> ResourceRecord:
        """Make an image definition in an existing local gallery, or return the one that exists.

        Raises:
            PermanentError: ``BadGalleryId`` for an id that is not an image definition's or whose gallery does not
                exist, ``InvalidParameter`` for an OS type or Hyper-V generation Azure does not have.
        """
        ref = parse_gallery_id(image_definition_id)
        if ref is None or ref.image is None or ref.version is not None:
            raise PermanentError(
                f"'{image_definition_id}' is not an image definition id (.../galleries/<gallery>/images/<name>)",
                kind="BadGalleryId",
            )
        gallery = await asyncio.to_thread(self.store.get, record_key(ref.gallery_id))
        if gallery is None:
            raise PermanentError(f"the gallery {ref.gallery_id} does not exist; make it first", kind="BadGalleryId")
        if os_type not in ("Linux", "Windows") or hyper_v_generation not in ("V1", "V2"):
            raise PermanentError(
                f"osType must be Linux or Windows and hyperVGeneration V1 or V2, not {os_type}/{hyper_v_generation}",
                kind="InvalidParameter",
            )
        return await asyncio.to_thread(
            self.store.claim,
            record_key(image_definition_id),
            kind=KIND_IMAGE_DEFINITION,
            build_id=None,
            tags={TAG_CREATED_BY: CREATED_BY},
            data={
                "id": image_definition_id,
                "gallery": record_key(ref.gallery_id),
                "location": gallery.data["location"],
                "osType": os_type,
                "hyperVGeneration": hyper_v_generation,
                "identifier": {"publisher": publisher, "offer": offer, "sku": sku},
            },
        )

    async def list_gallery(self, gallery_id: str | None = None) -> list[ResourceRecord]:
        """Galleries, image definitions and versions (of one gallery, or all), in id order."""
        prefix = record_key(gallery_id.rstrip("/")) if gallery_id else ""
        records: list[ResourceRecord] = []
        for kind in (KIND_GALLERY, KIND_IMAGE_DEFINITION, KIND_IMAGE_VERSION):
            records += await asyncio.to_thread(self.store.list, kind=kind)
        return sorted(
            (r for r in records if r.id == prefix or r.id.startswith(f"{prefix}/") or not prefix),
            key=lambda r: (r.id.rsplit("/versions/", 1)[0], version_key(r.data.get("version", ""))),
        )

    async def list_resources(
        self, orphans_only: bool = False, *, active_builds: Collection[str] = ()
    ) -> list[ResourceRecord]:
        """Every recorded resource, or only the orphans: temporary resources of a build not in ``active_builds``
        (the builds whose workflows are open). Outputs, logs and galleries are never orphans."""
        records = await asyncio.to_thread(self.store.list)
        if not orphans_only:
            return records
        return [r for r in records if r.build_id and r.build_id not in active_builds and r.role == ROLE_TEMPORARY]


async def read_log(uri: str, offset: int = 0) -> bytes:
    """The bytes of a build log from ``offset`` on (empty when there are none yet), for ``kiln logs --follow``.

    A local (Azurite) log is read with the local account key, an Azure one with the caller's Azure identity.
    """
    where = split_blob_url(uri)
    if where and where[0] in azurite.local_accounts():
        async with BlobClient.from_blob_url(uri, credential=azurite.credential(where[0])) as blob:
            return await _read_from(blob, offset)
    from azure.identity.aio import DefaultAzureCredential

    async with DefaultAzureCredential() as identity, BlobClient.from_blob_url(uri, credential=identity) as blob:
        return await _read_from(blob, offset)


async def _read_from(blob: BlobClient, offset: int) -> bytes:
    try:
        return await (await blob.download_blob(offset=offset)).readall()
    except ResourceNotFoundError:
        return b""
    except HttpResponseError as err:
        if err.status_code == 416:  # nothing past offset yet
            return b""
        raise
