"""A fixed VHD's used pages, up to page blobs and back.

The captured image is a fixed VHD file that is mostly empty, so uploads send only its non-zero 512-byte pages, read
once however many blobs they go to (Azurite cannot copy a large blob between accounts, and has no Put Page From
URL, so one region cannot be fed from another). A download fetches only the blob's page ranges and leaves the rest
of the file a hole.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob.aio import BlobClient

from activities.clouds.aib.tags import blob_metadata, written_by
from activities.clouds.base import PermanentError

PAGE = 512
MAX_PAGE_WRITE = 4 * 1024 * 1024  # the largest Put Page
MERGE_GAP = 64 * 1024
_ZERO_PAGE = bytes(PAGE)
_ZERO_BLOCK = bytes(64 * 1024)
_BATCH_BYTES = 32 * 1024 * 1024  # used bytes read ahead while the previous batch uploads
_PARALLEL_WRITES = 8


def write_runs(buf: bytes) -> Iterator[tuple[int, int]]:
    """The non-zero runs of ``buf`` joined across gaps shorter than MERGE_GAP: a page write costs a request,
    which is worth far more than the few zero bytes a short gap adds to it."""
    current: tuple[int, int] | None = None
    for start, end in nonzero_runs(buf):
        if current is not None and start - current[1] < MERGE_GAP:
            current = (current[0], end)
            continue
        if current is not None:
            yield current
        current = (start, end)
    if current is not None:
        yield current


def nonzero_runs(buf: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of 512-byte pages of ``buf`` that are not all zero; ``buf`` starts on a page."""
    size = len(buf)
    pos = 0
    while pos < size:
        pos = _next_nonzero_page(buf, pos)
        if pos >= size:
            return
        end = _next_zero_page(buf, pos)
        yield pos, end
        pos = end


def _next_nonzero_page(buf: bytes, pos: int) -> int:
    while buf[pos : pos + len(_ZERO_BLOCK)] == _ZERO_BLOCK:
        pos += len(_ZERO_BLOCK)
    while pos < len(buf) and buf[pos : pos + PAGE] == _ZERO_PAGE:
        pos += PAGE
    return min(pos, len(buf))


def _next_zero_page(buf: bytes, pos: int) -> int:
    # bytes.find runs in C; a 512-zero run it finds holds an aligned zero page only if the next page boundary starts
    # one, and no aligned zero page can lie before the first run found.
    while (found := buf.find(_ZERO_PAGE, pos)) != -1:
        page = -(-found // PAGE) * PAGE
        if buf[page : page + PAGE] == _ZERO_PAGE:
            return page
        pos = page + 1
    return len(buf)


class _UsedPages:
    """Reads the non-zero pages of a file from an offset on, in batches, skipping the file's holes unread."""

    def __init__(self, path: Path, start: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self.position = start

    def close(self) -> None:
        os.close(self._fd)

    def next_batch(self, limit: int) -> tuple[list[tuple[int, bytes]], int]:
        """Up to about ``limit`` used bytes as ``(offset, data)`` runs of at most 4 MiB, and the offset read up to."""
        batch: list[tuple[int, bytes]] = []
        total = 0
        while total < limit and self.position < self.size:
            try:
                data_at = os.lseek(self._fd, self.position, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to the end
                self.position = self.size
                break
            start = data_at // PAGE * PAGE
            hole_at = os.lseek(self._fd, data_at, os.SEEK_HOLE)
            end = min(self.size, -(-hole_at // PAGE) * PAGE, start + MAX_PAGE_WRITE)
            chunk = os.pread(self._fd, end - start, start)
            for a, b in write_runs(chunk):
                batch.append((start + a, chunk[a:b]))
                total += b - a
            self.position = start + len(chunk)
        return batch, self.position


async def used_bytes(path: Path) -> int:
    """How many bytes of ``path`` a page-blob upload sends: its non-zero pages."""
    reader = await asyncio.to_thread(_UsedPages, path, 0)
    total = 0
    try:
        while True:
            batch, _ = await asyncio.to_thread(reader.next_batch, _BATCH_BYTES)
            if not batch:
                return total
            total += sum(len(data) for _, data in batch)
    finally:
        reader.close()


async def run_all(work: Iterable[Awaitable[Any]]) -> None:
    """Run everything at once; on the first failure cancel the rest and raise that failure itself, so the activity
    reports the storage error rather than an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            for item in work:
                group.create_task(item)
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None


async def send_used_pages(path: Path, blobs: list[BlobClient], *, start: int, on_batch: Callable[[int], None]) -> int:
    """Write the non-zero pages of ``path`` from ``start`` on to every blob of ``blobs``, reading the file once.

    ``on_batch`` gets the offset up to which every blob is complete. Returns the bytes sent to each blob.
    """
    reader = await asyncio.to_thread(_UsedPages, path, start)
    limit = asyncio.Semaphore(_PARALLEL_WRITES)

    async def put(blob: BlobClient, offset: int, data: bytes) -> None:
        async with limit:
            await blob.upload_page(data, offset=offset, length=len(data))

    sent = 0
    ahead = asyncio.create_task(asyncio.to_thread(reader.next_batch, _BATCH_BYTES))
    try:
        while True:
            batch, position = await ahead
            if not batch:
                return sent
            ahead = asyncio.create_task(asyncio.to_thread(reader.next_batch, _BATCH_BYTES))
            await run_all(put(blob, offset, data) for blob in blobs for offset, data in batch)
            sent += sum(len(data) for _, data in batch)
            on_batch(position)
    finally:
        with suppress(Exception, asyncio.CancelledError):
            await ahead  # the reading thread must finish before its file is closed
        reader.close()


async def resumable(blob: BlobClient, size: int, build_id: str) -> bool:
    """Whether ``blob`` is this build's unfinished upload of the right size, to carry on with."""
    try:
        props = await blob.get_blob_properties()
    except ResourceNotFoundError:
        return False
    return props.size == size and written_by(props.metadata, build_id)


async def upload(
    path: Path,
    blobs: list[BlobClient],
    *,
    build_id: str,
    resume_offset: int,
    progress: Callable[[int], None],
) -> int:
    """Make each blob a page blob holding the file; carry on from ``resume_offset`` when every blob is this
    build's unfinished upload, else start over. Returns the bytes sent to each blob."""
    size = (await asyncio.to_thread(path.stat)).st_size
    if size % PAGE:
        raise PermanentError(f"the captured image {path} is not a whole number of 512-byte pages", kind="BadVhd")
    if resume_offset <= 0 or not all(await asyncio.gather(*(resumable(b, size, build_id) for b in blobs))):
        resume_offset = 0
        for blob in blobs:
            await blob.create_page_blob(size, metadata=blob_metadata(build_id))
    return await send_used_pages(path, blobs, start=resume_offset, on_batch=progress)


async def upload_disks(
    disks: list[tuple[Path, list[BlobClient]]],
    *,
    build_id: str,
    resume: dict[str, Any],
    progress: Callable[[int, int], None],
) -> None:
    """Upload an image's disks (its OS disk, then its data disks), each to its blobs, one disk after the other.

    ``progress(disk, offset)`` is called as each disk's upload goes on; ``resume`` is the last such checkpoint of an
    earlier try, ``{"disk": i, "offset": n}``: the disks before ``i`` are whole, and disk ``i`` carries on from ``n``.
    """
    first = int(resume.get("disk", 0))
    for index, (path, blobs) in enumerate(disks[first:], start=first):
        await upload(
            path,
            blobs,
            build_id=build_id,
            resume_offset=int(resume.get("offset", 0)) if index == first else 0,
            progress=functools.partial(progress, index),
        )


async def download(blob: BlobClient, path: Path) -> None:
    """Write the page blob to ``path``, whole or not at all: only its page ranges are read, the rest stays a hole.

    Raises:
        ResourceNotFoundError: the blob is gone.
    """
    size = (await blob.get_blob_properties()).size
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.part")
    fd = await asyncio.to_thread(os.open, partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    limit = asyncio.Semaphore(_PARALLEL_WRITES)

    async def fetch(offset: int, length: int) -> None:
        async with limit:
            data = await (await blob.download_blob(offset=offset, length=length)).readall()
        await asyncio.to_thread(os.pwrite, fd, data, offset)

    try:
        await asyncio.to_thread(os.ftruncate, fd, size)
        pieces = [
            (offset, min(MAX_PAGE_WRITE, r.end + 1 - offset))
            async for r in blob.list_page_ranges()
            for offset in range(r.start, r.end + 1, MAX_PAGE_WRITE)
        ]
        await run_all(fetch(offset, length) for offset, length in pieces)
        await asyncio.to_thread(os.fsync, fd)
    except BaseException:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise
    finally:
        await asyncio.to_thread(os.close, fd)
    await asyncio.to_thread(os.replace, partial, path)  # whole or absent, even to a reader in another process
