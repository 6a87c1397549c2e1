"""A SharedImage distribution target on the local cloud: a gallery image version replicated to its regions.

Each target region has its own storage account; a version's replicas there are page blobs, the first written from
the captured VHD (the file read once for every region at the same time), the others server-side copies of it within
the region's account. A version of an image with data disks has them as Azure's ``dataDiskImages``: each data disk
is replicated as the OS disk is, to blobs of its own beside it. The version is a record, claimed atomically before
anything is written, so two builds never number the same version; a region counts as done only while its replicas
(of every disk) are there in full, so a retry skips it.

A Shallow version (``replicationMode``) is, as in a gallery, one replica in the build's region (``aib.targets``
refuses any other): that replica is written as a Full version's first one is, since the captured disk a gallery
would refer to goes with the build's cleanup; the record says which mode it was made with.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from activities.clouds.aib.ids import GalleryRef, parse_gallery_id, region_key
from activities.clouds.aib.tags import TAG_REVOKED
from activities.clouds.aib.targets import ImageDefinition, shared_image_target, target_regions
from activities.clouds.aib.versions import choose_version, version_key
from activities.clouds.base import PermanentError, Progress
from activities.clouds.local import azurite, vhd_pages
from activities.clouds.local.accounts import LocalAccounts
from activities.clouds.local.admin import KIND_IMAGE_VERSION
from activities.clouds.local.capture import vhd_file
from activities.clouds.local.outputs import (
    COMPLETED,
    CREATING,
    SUCCEEDED,
    LocalImage,
    captured_disks,
    image_vhd,
    output_data,
    output_tags,
)
from activities.clouds.local.records import ResourceRecord, record_key
from workflows.models import DistributeRequest, RunOutput
from workflows.template import SharedImageDistributor

GALLERY_CONTAINER = "gallery"


def disk_blobs(region: dict[str, Any]) -> list[list[str]]:
    """A version's replicas in one region, by disk: the OS disk's, then each data disk's, by LUN."""
    return [region.get("blobs", []), *region.get("dataDiskBlobs", [])]


def region_blobs(region: dict[str, Any]) -> list[str]:
    """Every blob of a version in one region: each replica of each disk."""
    return [url for urls in disk_blobs(region) for url in urls]


class LocalGalleries:
    """The ``Galleries`` of the local cloud: the records ``kiln gallery create`` makes."""

    def __init__(self, accounts: LocalAccounts) -> None:
        self._accounts = accounts

    async def gallery_exists(self, ref: GalleryRef) -> bool:
        return await self._accounts.db(self._accounts.store.get, record_key(ref.gallery_id)) is not None

    async def image_definition(self, ref: GalleryRef) -> ImageDefinition | None:
        record = await self._accounts.db(self._accounts.store.get, record_key(ref.image_id))
        if record is None:
            return None
        return ImageDefinition(
            os_type=record.data["osType"],
            hyper_v_generation=record.data["hyperVGeneration"],
            location=record.data["location"],
        )

    def how_to_make(self, ref: GalleryRef) -> str:
        return f"`kiln gallery create {ref.image_id}` makes them"

    async def versions(self, ref: GalleryRef) -> list[ResourceRecord]:
        """Every version of an image definition, finished or not."""
        records = await self._accounts.db(self._accounts.store.list, kind=KIND_IMAGE_VERSION)
        return [r for r in records if r.data.get("imageDefinition") == record_key(ref.image_id)]


class GalleryTarget:
    """Writes SharedImage targets, and finds the versions they made for later builds' SharedImageVersion sources."""

    def __init__(self, accounts: LocalAccounts, galleries: LocalGalleries) -> None:
        self._accounts = accounts
        self._galleries = galleries

    async def distribute(
        self, request: DistributeRequest, target: SharedImageDistributor, resume: dict[str, Any], progress: Progress
    ) -> RunOutput:
        """Claim the version, write each disk's first replica in every pending region at once, then copy it to the
        region's other replicas. ``resume`` holds the version, and the disk and offset the upload reached."""
        accounts, build = self._accounts, request.build
        ref, definition = await shared_image_target(request, galleries=self._galleries)
        disks = captured_disks(request)
        plan: dict[str, dict[str, Any]] = {}
        for region, field in target_regions(target, index=request.index, definition=definition):
            plan[region_key(region.name)] = {
                "name": region.name,
                "account": azurite.account_for_region(region.name, field=field),
                "replicaCount": max(region.replica_count, 1),
                "storageAccountType": region.storage_account_type,
                "status": "Pending",
            }
        record = await self._claim_version(request, target, ref, plan, disks)
        version = record.data["version"]
        folder = ref.version_id(version).lower().lstrip("/")

        def replicas(entry: dict[str, Any], disk: str) -> list[str]:
            return [
                accounts.blob(entry["account"], GALLERY_CONTAINER, f"{folder}/{disk}replica-{n}.vhd").url
                for n in range(entry["replicaCount"])
            ]

        for key, entry in plan.items():
            entry["blobs"] = replicas(entry, "")
            entry["dataDiskBlobs"] = [replicas(entry, f"lun{lun}/") for lun in range(len(disks) - 1)]
            before = record.data.get("regions", {}).get(key, {})
            if before.get("status") == COMPLETED and disk_blobs(before) == disk_blobs(entry):
                entry["status"] = COMPLETED
        sizes = [(await asyncio.to_thread(disk.stat)).st_size for disk in disks]
        # A region counts as done only if its replicas are still there in full.
        for entry in plan.values():
            if entry["status"] == COMPLETED:
                for urls, size in zip(disk_blobs(entry), sizes, strict=True):
                    for url in urls:
                        if not await vhd_pages.resumable(accounts.blob_at(url), size, build.build_id):
                            entry["status"] = "Pending"
        for entry in plan.values():
            for url in region_blobs(entry):
                await accounts.record_blob(
                    url,
                    build.build_id,
                    tags=output_tags(request),
                    data=output_data(request, state=CREATING, parent=record.id),
                )
        await accounts.db(accounts.store.update, record.id, {"regions": plan})

        def checkpoint(disk: int, offset: int) -> dict[str, Any]:
            done = sorted(k for k, e in plan.items() if e["status"] == COMPLETED)
            return {"version": version, "disk": disk, "offset": offset, "completed": done}

        pending = {k: e for k, e in plan.items() if e["status"] != COMPLETED}
        if pending:
            for entry in pending.values():
                await accounts.ensure_container(entry["account"], GALLERY_CONTAINER)
            firsts = [[accounts.blob_at(urls[0]) for urls in disk_blobs(e)] for e in pending.values()]
            await vhd_pages.upload_disks(
                [(disk, [region[index] for region in firsts]) for index, disk in enumerate(disks)],
                build_id=build.build_id,
                resume=resume if resume.get("version") == version else {},
                progress=lambda disk, at: progress(checkpoint(disk, at)),
            )

            async def finish(entry: dict[str, Any]) -> None:
                await self._finish_region(entry)
                entry["status"] = COMPLETED
                await accounts.db(accounts.store.update, record.id, {"regions": plan})
                progress(checkpoint(len(disks) - 1, sizes[-1]))

            # A region that fails does not stop the others: what they finish, a retry skips.
            results = await asyncio.gather(*(finish(e) for e in pending.values()), return_exceptions=True)
            if failed := next((r for r in results if isinstance(r, BaseException)), None):
                raise failed
        for entry in plan.values():
            for url in region_blobs(entry):
                await accounts.db(accounts.store.update, url, {"state": SUCCEEDED})
        await accounts.db(accounts.store.update, record.id, {"state": SUCCEEDED, "regions": plan})
        return RunOutput(
            run_output_name=target.run_output_name,
            type="SharedImage",
            artifact_id=record.data["id"],
            replication={e["name"]: e["status"] for e in plan.values()},
        )

    async def _claim_version(
        self,
        request: DistributeRequest,
        target: SharedImageDistributor,
        ref: GalleryRef,
        regions: dict[str, Any],
        disks: list[Path],
    ) -> ResourceRecord:
        """The version record this target writes: the one an earlier try of it claimed, or a new one numbered by
        AIB's versioning. Claiming is atomic, so two builds never number the same version."""
        accounts, build = self._accounts, request.build
        for record in await accounts.db(accounts.store.list, build_id=build.build_id, kind=KIND_IMAGE_VERSION):
            if record.data.get("targetIndex") == request.index and record.data.get("imageDefinition") == record_key(
                ref.image_id
            ):
                return record
        data = output_data(
            request,
            imageDefinition=record_key(ref.image_id),
            state=CREATING,
            regions=regions,
            excludeFromLatest=target.exclude_from_latest,
            replicationMode=target.replication_mode or "Full",
            osType=request.source.os_type,
            hyperVGeneration=request.image.hyper_v_generation,
            sizeBytes=request.image.size_bytes,
            dataDiskImages=[{"lun": lun, "sizeBytes": vhd_file(disk).size_bytes} for lun, disk in enumerate(disks[1:])],
            sourceImage=request.source.image_id,
            sourceVersion=request.source.exact_version,
        )
        while True:  # another build may claim the number first; then choose again
            existing = [r.data["version"] for r in await self._galleries.versions(ref)]
            version = choose_version(
                target, ref, index=request.index, source_version=request.source.exact_version, existing=existing
            )
            record = await accounts.db(
                accounts.store.claim,
                record_key(ref.version_id(version)),
                kind=KIND_IMAGE_VERSION,
                build_id=build.build_id,
                tags=output_tags(request),
                data={**data, "id": ref.version_id(version), "version": version},
            )
            if record.build_id == build.build_id:
                return record

    async def _finish_region(self, entry: dict[str, Any]) -> None:
        """Copy each disk's first replica in a region to its other replicas: server-side, within the region's
        account."""
        for urls in disk_blobs(entry):
            first = self._accounts.blob_at(urls[0])
            for url in urls[1:]:
                copy = self._accounts.blob_at(url)
                await copy.start_copy_from_url(first.url)
                while (props := await copy.get_blob_properties()).copy.status == "pending":
                    await asyncio.sleep(0.5)
                if props.copy.status != "success":
                    raise RuntimeError(
                        f"copying {first.url} to {url} ended {props.copy.status}: {props.copy.status_description}"
                    )

    async def locate(self, image_id: str) -> LocalImage:
        """The VHDs of a finished gallery image version (``.../versions/latest``: the highest one not excluded from
        latest), its OS disk's and its data disks', downloaded once into the image cache.

        Raises:
            PermanentError: ``BadSharedImageVersionSource`` when the id names no such version.
        """
        ref = parse_gallery_id(image_id)
        if ref is None or ref.image is None or ref.version is None:
            raise PermanentError(
                f"properties.source.imageVersionId: '{image_id}' is not a gallery image version id "
                "(.../galleries/<gallery>/images/<definition>/versions/<x.y.z or latest>)",
                kind="BadSharedImageVersionSource",
            )
        versions = [r for r in await self._galleries.versions(ref) if r.data.get("state") == SUCCEEDED]
        if ref.version.lower() == "latest":
            candidates = [r for r in versions if not r.data.get("excludeFromLatest")]
            found = max(candidates, key=lambda r: version_key(r.data["version"]), default=None)
        else:
            found = next((r for r in versions if r.data["version"] == ref.version), None)
        if found is None:
            names = sorted((r.data["version"] for r in versions), key=version_key)
            raise PermanentError(
                f"properties.source.imageVersionId: no version '{ref.version}' of {ref.image_id}"
                f"{' that is not excluded from latest' if ref.version.lower() == 'latest' else ''}; "
                f"versions: {', '.join(names) or 'none'}",
                kind="BadSharedImageVersionSource",
            )
        region = next(e for e in found.data["regions"].values() if e["status"] == COMPLETED)
        path, *data_disks = [await image_vhd(self._accounts, urls[0]) for urls in disk_blobs(region)]
        return LocalImage(
            path,
            found.data["version"],
            found.data["hyperVGeneration"],
            found.data.get(TAG_REVOKED, ""),
            data_disks=tuple(data_disks),
        )

    async def _version(self, version_id: str) -> ResourceRecord:
        record = await self._accounts.db(self._accounts.store.get, record_key(version_id))
        if record is None or record.kind != KIND_IMAGE_VERSION:
            raise PermanentError(f"{version_id}: there is no such gallery image version", kind="ImageVersionNotFound")
        return record

    async def retire(self, version_id: str, *, end_of_life: str, exclude_from_latest: bool, revoked: str) -> None:
        record = await self._version(version_id)
        data: dict[str, Any] = {"endOfLifeDate": end_of_life}
        if exclude_from_latest:
            data["excludeFromLatest"] = True
        if revoked:
            data[TAG_REVOKED] = revoked
        await self._accounts.db(self._accounts.store.update, record.id, data)

    async def delete_version(self, version_id: str) -> None:
        """Delete the version's replicas of each disk in every region, then its record."""
        record = await self._accounts.db(self._accounts.store.get, record_key(version_id))
        if record is None:
            return
        for entry in record.data.get("regions", {}).values():
            for url in region_blobs(entry):
                await self._accounts.delete_blob(url)
                await self._accounts.db(self._accounts.store.forget, url)
        await self._accounts.db(self._accounts.store.forget, record.id)
