"""Blob data: staged artifacts, build logs and VHD outputs.

Where things live:

* Staged artifacts go to the build's staging storage account (container ``staging``, one folder per build).
* Logs (``packerlogs/<build id>/customization.log``, append blobs) and VHD outputs without a ``uri`` go to the
  *output account*: the long-lived account named by ``KILN_LOG_ACCOUNT`` when set, else the staging account.
  With a log account the staging group is deleted whole at cleanup and the logs outlive it; without one the
  staging account is kept at cleanup (as AIB keeps its staging account) and only the rest is deleted, the
  account staying tagged with the build id for the janitor.
"""

from __future__ import annotations

import hashlib
from contextlib import suppress
from datetime import UTC, datetime, timedelta

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobSasPermissions, generate_blob_sas

from activities.clouds.aib.names import staged_blob_name
from activities.clouds.aib.tags import blob_metadata, written_by
from activities.clouds.azure.clients import BlobClients, split_blob_url
from activities.clouds.azure.errors import arm_call
from workflows.models import Artifact, StagedArtifact

# Staging accounts take no shared keys, so writing to them needs a data role; one missing is not retried.
WRITE_BLOBS = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write (a Storage Blob Data role)"
# A staged file a build VM fetches itself (a large File customizer's source on Windows) is readable this long.
READ_URL_HOURS = 2


async def ensure_container(blobs: BlobClients, url: str) -> None:
    async with arm_call(f"blob container {url}", needs=WRITE_BLOBS):
        with suppress(ResourceExistsError):
            await blobs.container(url).create_container()


async def stage(
    blobs: BlobClients, container_url: str, build_id: str, artifact: Artifact, data: bytes
) -> StagedArtifact:
    url = f"{container_url.rstrip('/')}/{build_id}/{staged_blob_name(artifact, data)}"
    async with arm_call(f"{artifact.field}: staging {artifact.source_uri} as {url}", needs=WRITE_BLOBS):
        await blobs.blob(url).upload_blob(data, overwrite=True, metadata=blob_metadata(build_id))
    return StagedArtifact(
        source_uri=artifact.source_uri, staged_uri=url, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )


async def read(blobs: BlobClients, url: str) -> bytes:
    return await (await blobs.blob(url).download_blob()).readall()


async def read_url(blobs: BlobClients, url: str, *, account_key: str | None) -> str:
    """``url`` with a read-only SAS for ``READ_URL_HOURS``: signed with a user delegation key (the worker's Entra
    identity; staging accounts take no shared keys), or with ``account_key`` where that is all a storage
    emulator takes."""
    blob = blobs.blob(url)
    start = datetime.now(UTC) - timedelta(minutes=5)  # clock skew between the worker and storage
    expiry = start + timedelta(hours=READ_URL_HOURS)
    signing: dict[str, object] = {"account_key": account_key}
    if account_key is None:
        async with arm_call(
            f"a read URL for {url}",
            needs="Microsoft.Storage/storageAccounts/blobServices/generateUserDelegationKey/action",
        ):
            service = blobs.service(split_blob_url(url)[0])
            signing = {"user_delegation_key": await service.get_user_delegation_key(start, expiry)}
    sas = generate_blob_sas(
        blob.account_name,
        blob.container_name,
        blob.blob_name,
        permission=BlobSasPermissions(read=True),
        start=start,
        expiry=expiry,
        **signing,
    )
    return f"{blob.url}?{sas}"


async def delete_own_blob(blobs: BlobClients, url: str, build_id: str) -> None:
    """Delete the blob if this build wrote it: a VHD target's ``uri`` may name a blob someone else made."""
    blob = blobs.blob(url)
    with suppress(ResourceNotFoundError):
        properties = await blob.get_blob_properties()
        if written_by(properties.metadata, build_id):
            # Only the version looked at: a blob rewritten since then is no longer this build's.
            await blob.delete_blob(
                delete_snapshots="include", etag=properties.etag, match_condition=MatchConditions.IfNotModified
            )
