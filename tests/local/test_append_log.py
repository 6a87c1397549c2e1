"""The build log every cloud writes: appends that survive retries and takeovers, and a clear refusal."""

from __future__ import annotations

import base64
import uuid

import pytest
from azure.storage.blob.aio import BlobClient, ContainerClient

from activities.clouds.append_log import AppendLog
from activities.clouds.base import PermanentError
from activities.clouds.local import azurite as local_azurite


def blob_client(endpoint: str, name: str, *, key: str = local_azurite.ACCOUNT_KEY) -> BlobClient:
    account = local_azurite.STAGING_ACCOUNT
    url = f"{local_azurite.account_url(account, base=endpoint)}/logs-test/{name}"
    return BlobClient.from_blob_url(url, credential={"account_name": account, "account_key": key})


async def make_container(endpoint: str) -> None:
    account = local_azurite.STAGING_ACCOUNT
    async with ContainerClient(
        local_azurite.account_url(account, base=endpoint), "logs-test", credential=local_azurite.credential(account)
    ) as container:
        if not await container.exists():
            await container.create_container()


async def test_a_second_writer_carries_on_after_the_first(azurite: local_azurite.Azurite) -> None:
    await make_container(azurite.endpoint)
    name = f"{uuid.uuid4()}.log"
    async with blob_client(azurite.endpoint, name) as first_blob, blob_client(azurite.endpoint, name) as second_blob:
        first = await AppendLog.open(first_blob, metadata={})
        await first.append(b"one\n")
        second = await AppendLog.open(second_blob, metadata={})  # a worker that took the build over
        await second.append(b"two\n")
        await first.append(b"three\n")  # the first worker, still alive, appends after both
        assert await second.read() == b"one\ntwo\nthree\n"


async def test_a_refused_write_fails_at_once_naming_the_role(azurite: local_azurite.Azurite) -> None:
    await make_container(azurite.endpoint)
    wrong_key = base64.b64encode(b"not the account key at all, sorry").decode()
    async with blob_client(azurite.endpoint, f"{uuid.uuid4()}.log", key=wrong_key) as blob:
        with pytest.raises(PermanentError) as refused:
            await AppendLog.open(blob, metadata={})
    assert refused.value.type == "AuthorizationFailed"
    assert "Storage Blob Data Contributor" in refused.value.message
