"""A VHD distribution target on the local cloud: a page blob at the template's ``uri``, or in the staging account.

AIB writes a VHD without ``uri`` to its staging storage account; here that is ``vhds/<template>/<build>/`` in the
staging account, kept when the staging goes. A given ``uri`` must be a blob of a local account, and one that
another build (or a user) wrote is never overwritten.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from activities.clouds.aib.tags import written_by
from activities.clouds.base import PermanentError, Progress
from activities.clouds.local import azurite, vhd_pages
from activities.clouds.local.accounts import LocalAccounts, split_blob_url
from activities.clouds.local.outputs import CREATING, SUCCEEDED, captured_vhd, output_data, output_tags
from workflows.models import DistributeRequest, RunOutput
from workflows.template import VhdDistributor

VHD_CONTAINER = "vhds"


class VhdTarget:
    """Writes VHD targets, resuming an upload a worker that died left half done."""

    def __init__(self, accounts: LocalAccounts) -> None:
        self._accounts = accounts

    async def distribute(
        self, request: DistributeRequest, target: VhdDistributor, resume: dict[str, Any], progress: Progress
    ) -> RunOutput:
        """Upload the captured VHD's used pages; a retry carries on from the offset ``resume`` holds."""
        accounts, build = self._accounts, request.build
        field = f"properties.distribute[{request.index}].uri"
        if target.uri:
            where = split_blob_url(target.uri)
            if where is None or where[0] not in azurite.local_accounts():
                raise PermanentError(
                    f"{field}: '{target.uri}' is not a blob URL of a local storage account; local blobs look like "
                    f"{accounts.account_url(azurite.STAGING_ACCOUNT)}/<container>/<name>.vhd",
                    kind="BadDistributeType",
                )
            account, container, name = where
        else:
            account, container = azurite.STAGING_ACCOUNT, VHD_CONTAINER
            name = f"{build.template_name}/{build.build_id}/{target.run_output_name}.vhd"
        blob = accounts.blob(account, container, name)
        await accounts.ensure_container(account, container)
        with suppress(ResourceNotFoundError):
            if not written_by((await blob.get_blob_properties()).metadata, build.build_id):
                raise PermanentError(f"{field}: a blob already exists at {blob.url}", kind="BlobAlreadyExists")
        path = captured_vhd(request)
        await accounts.record_blob(
            blob.url,
            build.build_id,
            tags=output_tags(request),
            data=output_data(request, state=CREATING, container=f"{account}/{container}"),
        )
        sent = await vhd_pages.upload(
            path,
            [blob],
            build_id=build.build_id,
            resume_offset=int(resume.get("offset", 0)),
            progress=lambda offset: progress({"offset": offset}),
        )
        await accounts.db(accounts.store.update, blob.url, {"state": SUCCEEDED, "sentBytes": sent})
        return RunOutput(run_output_name=target.run_output_name, type="VHD", artifact_uri=blob.url)
