"""The local storage accounts: blob clients for kiln's Azurite accounts, and the records of what is written there.

Every account is an Azurite account (``azurite.py``): ``kilnstaging`` holds the staged artifacts, the logs and VHD
outputs; each local region has its own account holding the managed images and gallery replicas made there. The code
is plain azure-storage-blob, as on Azure. What Azure keeps in ARM (resource groups, managed images, galleries, image
definitions and versions, tags) is kept in the resource store (``records.py``), and every blob is recorded there
before it is written.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from activities.clouds.base import PermanentError
from activities.clouds.local import azurite
from activities.clouds.local.records import ResourceStore

KIND_BLOB = "blob"


def split_blob_url(url: str) -> tuple[str, str, str] | None:
    """``(account, container, blob)`` of a path-style (Azurite) or host-style (``<account>.blob.core...``) URL."""
    parsed = urllib.parse.urlparse(url)
    parts = urllib.parse.unquote(parsed.path).lstrip("/").split("/")
    host = parsed.hostname or ""
    if host.endswith(".blob.core.windows.net"):
        parts = [host.split(".", 1)[0], *parts]
    if parsed.scheme not in ("http", "https") or len(parts) < 3 or not all(parts[:3]):
        return None
    return parts[0], parts[1], "/".join(parts[2:])


class LocalAccounts:
    """Blob clients for the local accounts, one service client (and connection pool) per account, and the
    resource store their blobs are recorded in."""

    def __init__(self, *, store: ResourceStore, endpoint: str | None = None) -> None:
        self.store = store
        self.endpoint = (endpoint or azurite.endpoint()).rstrip("/")
        self._services: dict[str, BlobServiceClient] = {}

    async def close(self) -> None:
        for service in self._services.values():
            await service.close()
        self._services.clear()

    def account_url(self, account: str) -> str:
        return azurite.account_url(account, base=self.endpoint)

    def service(self, account: str) -> BlobServiceClient:
        if account not in self._services:
            self._services[account] = BlobServiceClient(
                self.account_url(account), credential=azurite.credential(account)
            )
        return self._services[account]

    def blob(self, account: str, container: str, name: str) -> BlobClient:
        return self.service(account).get_blob_client(container, name)

    def blob_at(self, url: str) -> BlobClient:
        """The client of a blob of the local accounts, by its URL.

        Raises:
            PermanentError: ``BadBlobUri`` for a URL of any other account.
        """
        where = split_blob_url(url)
        if where is None or where[0] not in azurite.local_accounts():
            raise PermanentError(f"'{url}' is not a blob of the local storage accounts", kind="BadBlobUri")
        return self.blob(*where)

    async def ensure_container(self, account: str, container: str) -> None:
        with suppress(ResourceExistsError):
            await self.service(account).create_container(container)

    async def db(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store call off the event loop: sqlite waits on disk and on other processes' locks."""
        return await asyncio.to_thread(call, *args, **kwargs)

    async def record_blob(self, url: str, build_id: str, *, tags: dict[str, str], data: dict[str, Any]) -> None:
        """Record a blob before it is written: a worker that dies between the two leaves nothing unrecorded."""
        await self.db(self.store.record, url, kind=KIND_BLOB, build_id=build_id, tags=tags, data=data)

    async def delete_blob(self, url: str) -> None:
        with suppress(ResourceNotFoundError):
            await self.blob_at(url).delete_blob(delete_snapshots="include")
