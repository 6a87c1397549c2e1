"""Distribution on Azure: a managed image, a gallery image version (replicated per region), or a VHD blob.

Replication and copies can outlast a worker, so the retry on another worker picks the same operation up instead
of starting another: a gallery version from the SDK poller's continuation token (or, if its worker died before
recording one, from the version itself, found by its tags), a managed image in another region from the snapshot's
copy there (named from the build), a VHD from its blob, which carries the build id from the moment its copy starts.
Success is judged by the resource itself: a version whose replication finished after the poller gave up counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute.models import GalleryImageVersion

from activities.clouds.aib.ids import (
    COMPUTE,
    GalleryRef,
    parse_gallery_id,
    parse_managed_image_id,
    region_key,
    resource_id,
)
from activities.clouds.aib.names import staging_group
from activities.clouds.aib.tags import (
    ROLE_OUTPUT,
    ROLE_TEMPORARY,
    TAG_BUILD_ID,
    blob_metadata,
    build_tags,
    written_by,
)
from activities.clouds.aib.targets import managed_image_target, publishing_regions, shared_image_target
from activities.clouds.aib.versions import choose_version
from activities.clouds.azure import storage
from activities.clouds.azure.clients import ArmClients, BlobClients, split_blob_url
from activities.clouds.azure.errors import arm_call, error_message, permanent
from activities.clouds.azure.exports import SnapshotExports
from activities.clouds.azure.galleries import AzureGalleries
from activities.clouds.azure.names import VHD_CONTAINER, snapshot_copy_name
from activities.clouds.azure.vm import AzureVms, lro
from activities.clouds.azure.waits import Backoff
from activities.clouds.base import PermanentError, Progress
from workflows.models import BuildContext, DistributeRequest, RunOutput
from workflows.template import Distributor, ManagedImageDistributor, SharedImageDistributor, VhdDistributor

TAG_OUTPUT_INDEX = "kilnOutputIndex"


def output_tags(request: DistributeRequest) -> dict[str, str]:
    return {
        **request.target.artifact_tags,
        **build_tags(request.build, role=ROLE_OUTPUT),
        TAG_OUTPUT_INDEX: str(request.index),
    }


def _version_sources(request: DistributeRequest) -> dict[str, Any]:
    """Where a gallery version's disks come from: the captured managed image (its data disks with it), or, of a
    TrustedLaunch build VM, which has no managed image, the OS and data disk snapshots."""
    image = request.image
    if not resource_id(image.id, field="the captured image").is_a(COMPUTE, "snapshots"):
        return {"source": {"id": image.id}}
    return {
        "osDiskImage": {"source": {"id": image.id}},
        "dataDiskImages": [{"lun": lun, "source": {"id": s}} for lun, s in enumerate(image.data_disk_snapshots)],
    }


class AzureDistribution:
    def __init__(
        self,
        arm: ArmClients,
        blobs: BlobClients,
        vms: AzureVms,
        *,
        galleries: AzureGalleries,
        output_account: Callable[[BuildContext], Awaitable[str]],
        poll: Backoff,
    ) -> None:
        self._arm = arm
        self._exports = SnapshotExports(arm, blobs)
        self._poll = poll
        self._blobs = blobs
        self._vms = vms
        self._galleries = galleries
        self._output_account = output_account

    async def distribute(
        self, request: DistributeRequest, *, resume: dict[str, Any] | None, progress: Progress
    ) -> RunOutput:
        target = request.target
        if isinstance(target, ManagedImageDistributor):
            return await self._managed_image(request, target, progress)
        if isinstance(target, SharedImageDistributor):
            return await self._shared_image(request, target, resume or {}, progress)
        assert isinstance(target, VhdDistributor)
        return await self._vhd(request, target, progress)

    # ---- managed image

    async def _managed_image(
        self, request: DistributeRequest, target: ManagedImageDistributor, progress: Progress
    ) -> RunOutput:
        """A managed image of the captured snapshot; in another region, of the snapshot's copy there, which is
        deleted once the image stands (ARM makes an image only from a source in the image's own region)."""
        field = f"properties.distribute[{request.index}].imageId"
        ref = managed_image_target(target, index=request.index)
        images = self._arm.compute.images
        elsewhere = region_key(target.location) != region_key(request.build.location)
        async with arm_call(f"{field} {target.image_id}", needs="Microsoft.Compute/images/write"):
            try:
                existing = await images.get(ref.group, ref.name)
            except ResourceNotFoundError:
                existing = None
            if existing is not None and (existing.tags or {}).get(TAG_BUILD_ID) != request.build.build_id:
                raise PermanentError(f"{field}: the managed image {target.image_id} already exists", kind="ImageExists")
        if existing is None or existing.provisioning_state != "Succeeded":
            source = request.image.uri
            if elsewhere:
                source = await self._regional_copy(request, target, progress)
            async with arm_call(f"{field} {target.image_id}", needs="Microsoft.Compute/images/write"):
                await lro(
                    images.begin_create_or_update(
                        ref.group,
                        ref.name,
                        {
                            "location": target.location,
                            "tags": output_tags(request),
                            "properties": {
                                "hyperVGeneration": request.image.hyper_v_generation,
                                "storageProfile": {
                                    "osDisk": {
                                        "osType": request.source.os_type,
                                        "osState": "Generalized",
                                        "snapshot": {"id": source},
                                    },
                                    # resolve_source refuses data disks with a target in another region.
                                    "dataDisks": [
                                        {"lun": lun, "snapshot": {"id": snapshot}}
                                        for lun, snapshot in enumerate(request.image.data_disk_snapshots)
                                    ],
                                },
                            },
                        },
                    )
                )
        if elsewhere:
            await self._delete_copy(request.build, request.index)
        return RunOutput(run_output_name=target.run_output_name, type="ManagedImage", artifact_id=target.image_id)

    async def _regional_copy(
        self, request: DistributeRequest, target: ManagedImageDistributor, progress: Progress
    ) -> str:
        """Copy the captured snapshot into the target's region (CopyStart, which takes incremental snapshots only)
        and wait for the data to arrive. The copy lives in the staging group, named from the build and tagged
        with it, so a retry finds it and cleanup removes one left half-made.

        Azure copies the incremental snapshots of one disk one at a time, so the targets in other regions take
        turns: each waits for the copies already running, and one that loses the race to start waits again."""
        group = staging_group(request.build, subscription=self._arm.subscription_id).name
        name = snapshot_copy_name(request.build.build_id, request.index)
        source = request.image.uri
        snapshots = self._arm.compute.snapshots
        needs = "Microsoft.Compute/snapshots/write"
        async with arm_call(f"snapshot {name} in {target.location}", needs=needs):
            try:
                copy = await snapshots.get(group, name)
            except ResourceNotFoundError:
                copy = None
            if copy is not None and (copy.provisioning_state == "Failed" or copy.copy_completion_error):
                await self._delete_copy(request.build, request.index)
                copy = None
            while copy is None:
                await self._wait_for_other_copies(group, source, name)
                try:
                    copy = await lro(
                        snapshots.begin_create_or_update(
                            group,
                            name,
                            {
                                "location": target.location,
                                "tags": {
                                    **build_tags(request.build, role=ROLE_TEMPORARY),
                                    TAG_OUTPUT_INDEX: str(request.index),
                                },
                                "sku": {"name": "Standard_LRS"},
                                "properties": {
                                    "creationData": {"createOption": "CopyStart", "sourceResourceId": source},
                                    "incremental": True,
                                },
                            },
                        )
                    )
                except HttpResponseError as err:
                    # Refused because another target's copy started first: its turn, then this one's.
                    if permanent(err, what=name, needs=needs) is not None or not await self._other_copies(
                        group, source, name
                    ):
                        raise
            progress({"copy": copy.id})  # for the activity's details; a retry finds the copy by its name
            pauses = self._poll.pauses()
            while (copy.completion_percent or 0) < 100:
                if copy.copy_completion_error:
                    error = copy.copy_completion_error
                    raise RuntimeError(f"copying the snapshot to {target.location} failed: {error.error_message}")
                await anext(pauses)
                copy = await snapshots.get(group, name)
        return copy.id

    async def _other_copies(self, group: str, source: str, name: str) -> list[str]:
        """Names of the copies of ``source`` other than ``name`` still running in the staging group."""
        return [
            s.name
            async for s in self._arm.compute.snapshots.list_by_resource_group(group)
            if s.name != name
            and s.creation_data is not None
            and (s.creation_data.create_option or "").lower() == "copystart"
            and (s.creation_data.source_resource_id or "").lower() == source.lower()
            and s.provisioning_state != "Failed"
            and not s.copy_completion_error
            and (s.completion_percent or 0) < 100
        ]

    async def _wait_for_other_copies(self, group: str, source: str, name: str) -> None:
        pauses = self._poll.pauses()
        while await self._other_copies(group, source, name):
            await anext(pauses)

    async def _delete_copy(self, build: BuildContext, index: int) -> None:
        group = staging_group(build, subscription=self._arm.subscription_id).name
        name = snapshot_copy_name(build.build_id, index)
        snapshots = self._arm.compute.snapshots
        try:
            copy = await snapshots.get(group, name)
        except ResourceNotFoundError:
            return
        if (copy.tags or {}).get(TAG_BUILD_ID) == build.build_id:
            await self._vms.delete(
                f"snapshot {name}", "Microsoft.Compute/snapshots", lambda: snapshots.begin_delete(group, name)
            )

    # ---- gallery image version

    async def _shared_image(
        self, request: DistributeRequest, target: SharedImageDistributor, resume: dict[str, Any], progress: Progress
    ) -> RunOutput:
        field = f"properties.distribute[{request.index}].galleryImageId"
        ref, image_definition = await shared_image_target(request, galleries=self._galleries)
        group, gallery, definition_name = ref.group, ref.gallery, ref.image
        versions = self._arm.compute.gallery_image_versions
        needs = "Microsoft.Compute/galleries/images/versions/write"
        async with arm_call(f"{field} {target.gallery_image_id}", needs=needs):
            version, earlier = resume.get("version"), None
            if not version:
                version, earlier = await self._version_for(request, target, ref)
            token = resume.get("token") if resume.get("version") == version else None
            poller = None
            if token:
                poller = await versions.begin_create_or_update(
                    group, gallery, definition_name, version, {}, continuation_token=token
                )
            elif earlier is not None and earlier.provisioning_state == "Failed":
                failed = await versions.get(group, gallery, definition_name, version, expand="ReplicationStatus")
                raise replication_failed(field, failed, "it ended Failed")
            elif earlier is not None:
                # An earlier try's PUT took effect, but its worker died before it could record the poller: wait on
                # the version itself rather than send the PUT (and restart a long replication) again.
                pauses = self._poll.pauses()
                while earlier.provisioning_state in ("Creating", "Updating", "Migrating"):
                    await anext(pauses)
                    earlier = await versions.get(group, gallery, definition_name, version)
                if earlier.provisioning_state != "Succeeded":
                    raise RuntimeError(f"gallery image version {version} ended {earlier.provisioning_state}")
            else:
                build_location = request.build.location
                regions = [
                    {
                        "name": r.name,
                        "regionalReplicaCount": r.replica_count,
                        "storageAccountType": r.storage_account_type,
                    }
                    for r in publishing_regions(
                        target, index=request.index, definition=image_definition, build_location=build_location
                    )
                ]
                poller = await versions.begin_create_or_update(
                    group,
                    gallery,
                    definition_name,
                    version,
                    {
                        # Where the captured image is, which ARM requires of a version's source.
                        "location": build_location,
                        "tags": output_tags(request),
                        "properties": {
                            "publishingProfile": {
                                "targetRegions": regions,
                                "excludeFromLatest": target.exclude_from_latest,
                                # Omitted unless given: the gallery's default is Full.
                                **({"replicationMode": target.replication_mode} if target.replication_mode else {}),
                            },
                            "storageProfile": _version_sources(request),
                        },
                    },
                )
                progress({"version": version, "token": poller.continuation_token()})
            try:
                if poller is not None:
                    await poller.result()
            except HttpResponseError as err:
                if permanent(err, what=field, needs=needs) is not None:
                    raise
                # The poller may give up while replication goes on; the version's own state decides.
                state = await versions.get(group, gallery, definition_name, version, expand="ReplicationStatus")
                if state.provisioning_state == "Failed":
                    raise replication_failed(field, state, error_message(err)) from err
                if state.provisioning_state != "Succeeded":
                    raise
            final = await versions.get(group, gallery, definition_name, version, expand="ReplicationStatus")
        status = final.replication_status
        replication = {s.region: s.state for s in (status.summary or [])} if status else {}
        return RunOutput(
            run_output_name=target.run_output_name, type="SharedImage", artifact_id=final.id, replication=replication
        )

    async def _version_for(
        self, request: DistributeRequest, target: SharedImageDistributor, ref: GalleryRef
    ) -> tuple[str, GalleryImageVersion | None]:
        """The version this target writes: one an earlier try of it already made (found by its tags, and returned
        with it), else the one AIB's versioning chooses."""
        assert ref.image is not None
        existing = [
            v
            async for v in self._arm.compute.gallery_image_versions.list_by_gallery_image(
                ref.group, ref.gallery, ref.image
            )
        ]
        for v in existing:
            if self._made_for(v, request.build, request.index):
                return v.name, v
        version = choose_version(
            target,
            ref,
            index=request.index,
            source_version=request.source.exact_version,
            existing=[v.name for v in existing],
        )
        return version, None

    @staticmethod
    def _made_for(version: GalleryImageVersion, build: BuildContext, index: int) -> bool:
        """Whether a gallery version is the one this build made for its target ``index``."""
        tags = version.tags or {}
        return tags.get(TAG_BUILD_ID) == build.build_id and tags.get(TAG_OUTPUT_INDEX) == str(index)

    # ---- VHD

    async def _vhd_url(self, build: BuildContext, target: VhdDistributor) -> str:
        """The artifactUri without a SAS (a SAS never goes into a run output), or a blob of the build's own."""
        if target.uri:
            return target.uri.split("?", 1)[0]
        account = await self._output_account(build)
        return f"{account.rstrip('/')}/{VHD_CONTAINER}/{build.build_id}/{target.run_output_name}.vhd"

    async def _vhd(self, request: DistributeRequest, target: VhdDistributor, progress: Progress) -> RunOutput:
        """Export the OS-disk snapshot (a read SAS, shared with the other VHD targets: see ``exports``) and copy it
        server-side to the target blob. The copy runs in the blob service, not here, and its blob carries the build
        id from the start: a retry that finds this build's copy still pending (or done) waits for that one instead
        of starting another, even when the worker that started it died before it could record the copy's id."""
        snapshot = resource_id(request.image.uri, field="the captured snapshot")
        url = await self._vhd_url(request.build, target)
        blob = self._blobs.blob(url)
        try:
            props = await blob.get_blob_properties()
        except ResourceNotFoundError:
            props = None
        attached = (
            props is not None
            and written_by(props.metadata, request.build.build_id)
            and props.copy.status in ("pending", "success")
        )
        try:
            if not attached:
                sas = await self._exports.grant(request, snapshot)
                account_url, container, _ = split_blob_url(url)
                await storage.ensure_container(self._blobs, f"{account_url}/{container}")
                copy = await blob.start_copy_from_url(sas, metadata=blob_metadata(request.build.build_id))
                progress({"blob": url, "copy": copy.get("copy_id")})
            pauses = self._poll.pauses()
            while (props := await blob.get_blob_properties()).copy.status == "pending":
                await anext(pauses)
            if props.copy.status != "success":
                raise RuntimeError(
                    f"copying the VHD to {url} ended {props.copy.status}: {props.copy.status_description}"
                )
        finally:
            # Also after a re-attach: the worker that granted the SAS died before it could count itself out.
            await self._exports.release(request, snapshot)
        return self._vhd_output(target, url)

    @staticmethod
    def _vhd_output(target: VhdDistributor, url: str) -> RunOutput:
        return RunOutput(run_output_name=target.run_output_name, type="VHD", artifact_uri=url)

    # ---- cleanup of unfinished outputs

    async def delete_output(self, build: BuildContext, target: Distributor, index: int) -> None:
        """Remove what this build made for the target: found by the build's tags, so a finished output of another
        build (or a user's image of the same name) is never touched."""
        compute = self._arm.compute
        if isinstance(target, ManagedImageDistributor):
            ref = parse_managed_image_id(target.image_id)
            if ref is None:
                return  # nothing was written to it: resolve source refuses such a target
            try:
                image = await compute.images.get(ref.group, ref.name)
            except ResourceNotFoundError:
                image = None
            if image is not None and (image.tags or {}).get(TAG_BUILD_ID) == build.build_id:
                await self._vms.delete(
                    f"image {ref.name}",
                    "Microsoft.Compute/images",
                    lambda: compute.images.begin_delete(ref.group, ref.name),
                )
            await self._delete_copy(build, index)
        elif isinstance(target, SharedImageDistributor):
            gallery_ref = parse_gallery_id(target.gallery_image_id)
            if gallery_ref is None or gallery_ref.image is None:
                return  # nothing was written to it: resolve source refuses such a target
            group, gallery, definition = gallery_ref.group, gallery_ref.gallery, gallery_ref.image
            versions = compute.gallery_image_versions
            try:
                mine = [
                    v.name
                    async for v in versions.list_by_gallery_image(group, gallery, definition)
                    if self._made_for(v, build, index)
                ]
            except ResourceNotFoundError:
                return
            for name in mine:
                await self._vms.delete(
                    f"gallery image version {name}",
                    "Microsoft.Compute/galleries/images/versions",
                    lambda name=name: versions.begin_delete(group, gallery, definition, name),
                )
        else:
            assert isinstance(target, VhdDistributor)
            await storage.delete_own_blob(self._blobs, await self._vhd_url(build, target), build.build_id)


def replication_failed(field: str, version: GalleryImageVersion, cause: str) -> PermanentError:
    """A version whose replication ended Failed (read with its replication status) fails its target, as Packer's
    wait on it fails AIB's: it is not published again, which would replicate every region anew for each retry."""
    summary = version.replication_status.summary if version.replication_status else None
    failed = ", ".join(f"{s.region} ({s.details or s.state})" for s in summary or [] if s.state == "Failed")
    return PermanentError(
        f"{field}: gallery image version {version.name} failed to replicate{f' to {failed}' if failed else ''}: {cause}",
        kind="ReplicationFailed",
    )
