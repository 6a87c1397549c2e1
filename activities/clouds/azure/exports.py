"""The captured snapshot's export (its read SAS), shared by the VHD targets that copy from it.

A snapshot has one export at a time: every beginGetAccess hands out a SAS of it, and one endGetAccess revokes them
all, failing the copies still reading. VHD targets run in parallel, possibly on several workers, so each counts
itself in before it asks for the SAS and out when its copy has ended, and only the last one out revokes. The count
is kept as blobs in the build's staging container (``<build>/exports/<snapshot>/<target index>``), which outlive a
worker that dies: its retry counts the same target in again and out at its end.

A target that counts itself in just after the last one looked and found nobody can meet a SAS revoked under its
copy; the copy fails, and the step's retry asks for a new SAS.
"""

from __future__ import annotations

from azure.core.exceptions import ResourceNotFoundError

from activities.clouds.aib.ids import ResourceId
from activities.clouds.aib.tags import blob_metadata
from activities.clouds.azure.clients import ArmClients, BlobClients
from activities.clouds.azure.errors import arm_call
from activities.clouds.azure.storage import WRITE_BLOBS
from activities.clouds.azure.vm import lro
from workflows.models import DistributeRequest

SAS_SECONDS = 4 * 3600


class SnapshotExports:
    """Grants and revokes of the captured snapshot's SAS, counted per VHD target."""

    def __init__(self, arm: ArmClients, blobs: BlobClients) -> None:
        self._arm = arm
        self._blobs = blobs

    @staticmethod
    def _prefix(request: DistributeRequest, snapshot: ResourceId) -> str:
        return f"{request.build.build_id}/exports/{snapshot.name}/"

    def _holder(self, request: DistributeRequest, snapshot: ResourceId) -> str:
        container = request.staging.storage_uri.rstrip("/")
        return f"{container}/{self._prefix(request, snapshot)}{request.index}"

    async def grant(self, request: DistributeRequest, snapshot: ResourceId) -> str:
        """Count this target in, then get a read SAS of the snapshot."""
        holder = self._holder(request, snapshot)
        async with arm_call(f"blob {holder}", needs=WRITE_BLOBS):
            await self._blobs.blob(holder).upload_blob(
                b"", overwrite=True, metadata=blob_metadata(request.build.build_id)
            )
        async with arm_call(f"snapshot {snapshot.name}", needs="Microsoft.Compute/snapshots/beginGetAccess/action"):
            access = await lro(
                self._arm.compute.snapshots.begin_grant_access(
                    snapshot.group, snapshot.name, {"access": "Read", "durationInSeconds": SAS_SECONDS}
                )
            )
        return access.access_sas

    async def release(self, request: DistributeRequest, snapshot: ResourceId) -> None:
        """Count this target out; the last one out revokes the SAS."""
        try:
            await self._blobs.blob(self._holder(request, snapshot)).delete_blob()
        except ResourceNotFoundError:
            pass
        container = self._blobs.container(request.staging.storage_uri)
        if [b async for b in container.list_blobs(name_starts_with=self._prefix(request, snapshot))]:
            return  # another target's copy still reads from the SAS
        async with arm_call(f"snapshot {snapshot.name}", needs="Microsoft.Compute/snapshots/endGetAccess/action"):
            await lro(self._arm.compute.snapshots.begin_revoke_access(snapshot.group, snapshot.name))
