"""The local cloud's staging: the staging group (a record), the build's staging container, staged artifacts and
the build's logs, in the staging account. The logs outlive the staging, as AIB keeps them."""

from __future__ import annotations

import hashlib
import re
from contextlib import suppress

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from activities.clouds.aib.names import staged_blob_name, staging_group
from activities.clouds.aib.tags import ROLE_LOG, ROLE_TEMPORARY, blob_metadata, kiln_tags
from activities.clouds.append_log import AppendLog
from activities.clouds.local import azurite
from activities.clouds.local.accounts import KIND_BLOB, LocalAccounts
from activities.clouds.local.records import record_key
from workflows.models import Artifact, BuildContext, Resource, StagedArtifact, Staging

KIND_GROUP = "resourceGroup"
KIND_CONTAINER = "storageContainer"
# The subscription of the staging groups kiln names; a template's stagingResourceGroup may name any.
LOCAL_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
LOGS_CONTAINER = "kiln-logs"


def _container_name(prefix: str, build_id: str) -> str:
    """A valid container name (3-63 of a-z, 0-9 and single hyphens) for a build id of any shape."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", f"{prefix}-{build_id}".lower())).strip("-")
    if len(name) > 63:
        name = f"{name[:54].rstrip('-')}-{hashlib.sha256(build_id.encode()).hexdigest()[:8]}"
    return name


class LocalStaging:
    """Create and delete a build's staging, stage its artifacts and open its logs."""

    def __init__(self, accounts: LocalAccounts) -> None:
        self.accounts = accounts

    def _staging_group_id(self, build: BuildContext) -> str:
        return staging_group(build, subscription=LOCAL_SUBSCRIPTION, any_subscription=True).id

    def _container_url(self, build: BuildContext) -> str:
        return f"{self.accounts.account_url(azurite.STAGING_ACCOUNT)}/{_container_name('staging', build.build_id)}"

    async def create_staging(self, build: BuildContext) -> Staging:
        """The staging group (a record) and the build's staging container. A named group that already exists is
        used but never taken over: only what kiln makes in it is deleted afterwards."""
        accounts, store = self.accounts, self.accounts.store
        group_id = self._staging_group_id(build)
        tags = kiln_tags(build.build_id, role=ROLE_TEMPORARY, extra=build.managed_resource_tags)
        existing = await accounts.db(store.get, record_key(group_id))
        created_group = existing is None or existing.build_id == build.build_id
        if created_group:
            await accounts.db(
                store.record,
                record_key(group_id),
                kind=KIND_GROUP,
                build_id=build.build_id,
                tags=tags,
                data={"id": group_id, "location": build.location},
            )
        container_url = self._container_url(build)
        await accounts.db(
            store.record,
            container_url,
            kind=KIND_CONTAINER,
            build_id=build.build_id,
            tags=tags,
            data={"resourceGroup": group_id},
        )
        with suppress(ResourceExistsError):
            await accounts.service(azurite.STAGING_ACCOUNT).create_container(
                _container_name("staging", build.build_id), metadata=blob_metadata(build.build_id)
            )
        await accounts.ensure_container(azurite.STAGING_ACCOUNT, LOGS_CONTAINER)
        resources = [Resource(id=container_url, kind=KIND_CONTAINER, owner="staging")]
        if created_group:
            resources.insert(0, Resource(id=group_id, kind=KIND_GROUP, owner="staging"))
        return Staging(
            resource_group_id=group_id,
            created_group=created_group,
            storage_uri=container_url,
            log_uri_prefix=f"{accounts.account_url(azurite.STAGING_ACCOUNT)}/{LOGS_CONTAINER}/{build.build_id}/",
            resources=resources,
        )

    async def delete_staging(self, build: BuildContext) -> None:
        """Delete the staging container and, if kiln made it, the group. The logs stay, as AIB keeps them.

        Everything is found from the build alone, so this works when create_staging never returned.
        """
        accounts, store = self.accounts, self.accounts.store
        with suppress(ResourceNotFoundError):
            await accounts.service(azurite.STAGING_ACCOUNT).delete_container(_container_name("staging", build.build_id))
        container_url = self._container_url(build)
        for record in await accounts.db(store.list, build_id=build.build_id, kind=KIND_BLOB):
            if record.data.get("container") == container_url:
                await accounts.db(store.forget, record.id)
        await accounts.db(store.forget, container_url)
        # By the build, not by the group's name: a group named before the name's rule changed is found too.
        for group in await accounts.db(store.list, build_id=build.build_id, kind=KIND_GROUP):
            await accounts.db(store.forget, group.id)

    async def stage_artifact(
        self, build: BuildContext, staging: Staging, artifact: Artifact, data: bytes
    ) -> StagedArtifact:
        blob = self.accounts.blob_at(f"{staging.storage_uri}/{staged_blob_name(artifact, data)}")
        await self.accounts.record_blob(
            blob.url,
            build.build_id,
            tags=kiln_tags(build.build_id, role=ROLE_TEMPORARY, extra=build.managed_resource_tags),
            data={"container": staging.storage_uri, "sourceUri": artifact.source_uri},
        )
        await blob.upload_blob(data, overwrite=True, metadata=blob_metadata(build.build_id))
        return StagedArtifact(
            source_uri=artifact.source_uri,
            staged_uri=blob.url,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
        )

    async def read_staged(self, build: BuildContext, staged: StagedArtifact) -> bytes:
        return await (await self.accounts.blob_at(staged.staged_uri).download_blob()).readall()

    async def open_log(self, build: BuildContext, staging: Staging, name: str) -> AppendLog:
        blob = self.accounts.blob_at(f"{staging.log_uri_prefix.rstrip('/')}/{name}")
        await self.accounts.record_blob(
            blob.url,
            build.build_id,
            tags=kiln_tags(build.build_id, role=ROLE_LOG, extra=build.managed_resource_tags),
            data={"container": LOGS_CONTAINER},
        )
        await self.accounts.ensure_container(azurite.STAGING_ACCOUNT, LOGS_CONTAINER)
        return await AppendLog.open(blob, metadata=blob_metadata(build.build_id))
