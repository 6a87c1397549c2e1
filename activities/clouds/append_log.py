"""A build log (customization.log, validation.log) as an append blob, for every cloud: Azure and Azurite alike."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

from azure.core.exceptions import HttpResponseError, ResourceExistsError
from azure.storage.blob import StorageErrorCode
from azure.storage.blob.aio import BlobClient

from activities.clouds.base import PermanentError

MAX_APPEND = 4 * 1024 * 1024  # the largest Append Block


@contextmanager
def refused_is_permanent(uri: str) -> Iterator[None]:
    """A 403 from storage is a missing role, which no retry grants: fail the step now, saying what is needed."""
    try:
        yield
    except HttpResponseError as err:
        if err.status_code == 403:
            raise PermanentError(
                f"writing the build log {uri} was refused ({err.error_code}): the worker's identity needs the "
                "Storage Blob Data Contributor role on the log's storage account",
                kind="AuthorizationFailed",
            ) from err
        raise


class AppendLog:
    """Each append is conditional on the length written so far, so an append the SDK retries after a lost
    response is not written twice, and a worker that takes a build over appends after what the last one wrote."""

    def __init__(self, blob: BlobClient, length: int) -> None:
        self.uri = blob.url
        self._blob = blob
        self._length = length

    @classmethod
    async def open(cls, blob: BlobClient, *, metadata: dict[str, str]) -> AppendLog:
        with refused_is_permanent(blob.url), suppress(ResourceExistsError):
            # if_none_match: a worker taking over the build appends to the log, it does not start it again
            await blob.create_append_blob(metadata=metadata, if_none_match="*")
        return cls(blob, (await blob.get_blob_properties()).size)

    async def append(self, data: bytes) -> None:
        with refused_is_permanent(self.uri):
            await self._append(data)

    async def _append(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_APPEND):
            chunk = data[start : start + MAX_APPEND]
            try:
                await self._blob.append_block(chunk, length=len(chunk), appendpos_condition=self._length)
            except HttpResponseError as err:
                if err.error_code != StorageErrorCode.APPEND_POSITION_CONDITION_NOT_MET:
                    raise
                length = (await self._blob.get_blob_properties()).size
                if not await self._landed(chunk, length):  # another writer appended: carry on after it
                    self._length = length
                    await self._blob.append_block(chunk, length=len(chunk), appendpos_condition=length)
            self._length += len(chunk)

    async def read(self) -> bytes:
        return await (await self._blob.download_blob()).readall()

    async def _landed(self, chunk: bytes, length: int) -> bool:
        """Whether an earlier try of this append was written after all: the log ends with it, where it belongs."""
        if length != self._length + len(chunk):
            return False
        tail = await self._blob.download_blob(offset=self._length, length=len(chunk))
        return await tail.readall() == chunk
