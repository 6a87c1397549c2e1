"""The local cloud's storage: staging storage, logs, and the distribution targets, as blobs in Azurite.

Every account is an Azurite account (``azurite.py``): ``kilnstaging`` holds the staged artifacts, the logs and VHD
outputs; each local region has its own account holding the managed images and gallery replicas made there. The
code is plain azure-storage-blob, as on Azure. What Azure keeps in ARM (resource groups, managed images, galleries,
image definitions and versions, tags) is kept in the resource store (``store.py``).

The captured image is a fixed VHD file that is mostly empty, so uploads send only its non-zero 512-byte pages. The
file is read once per distribution target and written to every region in parallel: Azurite cannot copy a large blob
between accounts, and has no Put Page From URL, so regions cannot be fed from each other. Replicas within one
region are server-side copies of that region's first replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from activities.clouds.append_log import AppendLog
from activities.clouds.base import PermanentError
from activities.clouds.local import azurite
from activities.clouds.local.records import (
    CREATED_BY,
    ROLE_LOG,
    ROLE_OUTPUT,
    ROLE_TEMPORARY,
    TAG_CREATED_BY,
    TAG_ROLE,
    ResourceRecord,
    ResourceStore,
    kiln_tags,
)
from activities.clouds.state import state_dir
from workflows.models import (
    Artifact,
    BuildContext,
    DistributeRequest,
    ResolvedSource,
    Resource,
    RunOutput,
    StagedArtifact,
    Staging,
)
from workflows.template import (
    Distributor,
    ImageTemplate,
    ManagedImageDistributor,
    SharedImageDistributor,
    VhdDistributor,
)

KIND_GROUP = "resourceGroup"
KIND_CONTAINER = "storageContainer"
KIND_BLOB = "blob"
KIND_MANAGED_IMAGE = "managedImage"
KIND_GALLERY = "gallery"
KIND_IMAGE_DEFINITION = "galleryImageDefinition"
KIND_IMAGE_VERSION = "galleryImageVersion"

LOCAL_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
LOGS_CONTAINER = "kiln-logs"
VHD_CONTAINER = "vhds"
IMAGES_CONTAINER = "images"
GALLERY_CONTAINER = "gallery"

# Blob states kept in record data. Only a finished output counts as an image; anything else is what delete_output
# removes after an interrupted distribution.
CREATING = "Creating"
SUCCEEDED = "Succeeded"
COMPLETED = "Completed"  # a region's replication status, as Azure reports it

PAGE = 512
MAX_PAGE_WRITE = 4 * 1024 * 1024  # the largest Put Page
_ZERO_PAGE = bytes(PAGE)
_ZERO_BLOCK = bytes(64 * 1024)
_BATCH_BYTES = 32 * 1024 * 1024  # used bytes read ahead while the previous batch uploads
_PARALLEL_WRITES = 8

_ARM = r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute/"
_GALLERY_ID = re.compile(
    _ARM + r"galleries/(?P<gallery>[^/]+)(?:/images/(?P<image>[^/]+)(?:/versions/(?P<version>[^/]+))?)?/?$", re.I
)
_MANAGED_IMAGE_ID = re.compile(_ARM + r"images/(?P<name>[^/]+)/?$", re.I)
_GROUP_ID = re.compile(r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/?$", re.I)
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class LocalImage:
    """A local image ready to boot from: its VHD in the image cache, and the version that pins it."""

    vhd_path: Path
    exact_version: str
    hyper_v_generation: str


@dataclass(frozen=True)
class _GalleryRef:
    sub: str
    rg: str
    gallery: str
    image: str | None
    version: str | None

    @property
    def gallery_id(self) -> str:
        return (
            f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/Microsoft.Compute/galleries/{self.gallery}"
        )

    @property
    def image_id(self) -> str:
        return f"{self.gallery_id}/images/{self.image}"

    def version_id(self, version: str) -> str:
        return f"{self.image_id}/versions/{version}"


def _gallery_ref(resource_id: str) -> _GalleryRef | None:
    m = _GALLERY_ID.match(resource_id)
    return _GalleryRef(m["sub"], m["rg"], m["gallery"], m["image"], m["version"]) if m else None


def _key(resource_id: str) -> str:
    """ARM ids are case-insensitive: records of ARM resources are kept under the lower-case id."""
    return resource_id.lower()


def parse_version(text: str) -> tuple[int, int, int] | None:
    """A gallery version ``major.minor.patch``, each a 32-bit integer; None for anything else."""
    m = _VERSION.match(text)
    if not m:
        return None
    parts = tuple(int(p) for p in m.groups())
    return parts if all(p < 2**31 for p in parts) else None  # type: ignore[return-value]


def next_version(existing: list[str], major: int = -1) -> str:
    """The version the ``Latest`` scheme gives: the patch after the highest existing version (of ``major``, when
    set). AIB's example, for a gallery holding 0.1.1 ... 2.1.0: unset or 2 gives 2.1.1, 1 gives 1.2.1, 0 gives 0.1.3."""
    versions = [v for v in map(parse_version, existing) if v]
    if major >= 0:
        versions = [v for v in versions if v[0] == major]
    if not versions:
        return "0.0.1" if major == 0 else f"{max(major, 1)}.0.0"
    a, b, c = max(versions)
    return f"{a}.{b}.{c + 1}"


def _container_name(prefix: str, build_id: str) -> str:
    """A valid container name (3-63 of a-z, 0-9 and single hyphens) for a build id of any shape."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", f"{prefix}-{build_id}".lower())).strip("-")
    if len(name) > 63:
        name = f"{name[:54].rstrip('-')}-{hashlib.sha256(build_id.encode()).hexdigest()[:8]}"
    return name


def _short_id(build_id: str) -> str:
    """Eight characters that tell builds apart: a uuid's first eight, else a hash of the id."""
    hexdigits = build_id.replace("-", "").lower()
    if re.fullmatch(r"[0-9a-f]{32}", hexdigits):
        return hexdigits[:8]
    return hashlib.sha256(build_id.encode()).hexdigest()[:8]


def staging_group_name(build: BuildContext) -> str:
    """``IT_<rg>_<template>_<id8>`` as AIB names it, shortened in the middle to ARM's 90 characters."""
    middle = f"{build.destination_resource_group or 'kiln'}_{build.template_name}"
    return f"IT_{middle[: 90 - 3 - 9]}_{_short_id(build.build_id)}"


MERGE_GAP = 64 * 1024


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


async def _all(work: Iterable[Awaitable[Any]]) -> None:
    """Run everything at once; on the first failure cancel the rest and raise that failure itself, so the activity
    reports the storage error rather than an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            for item in work:
                group.create_task(item)
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None


def _file_path(uri: str) -> Path:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file":
        raise PermanentError(f"the captured image '{uri}' is not a file:// URI", kind="BadCapturedImage")
    return Path(urllib.parse.unquote(parsed.path))


def _split_blob_url(url: str) -> tuple[str, str, str] | None:
    """``(account, container, blob)`` of a path-style (Azurite) or host-style (``<account>.blob.core...``) URL."""
    parsed = urllib.parse.urlparse(url)
    parts = urllib.parse.unquote(parsed.path).lstrip("/").split("/")
    host = parsed.hostname or ""
    if host.endswith(".blob.core.windows.net"):
        parts = [host.split(".", 1)[0], *parts]
    if parsed.scheme not in ("http", "https") or len(parts) < 3 or not all(parts[:3]):
        return None
    return parts[0], parts[1], "/".join(parts[2:])


def _blob_metadata(build_id: str) -> dict[str, str]:
    # Blob metadata names must be C# identifiers, so these are not the tag names.
    return {"kilnbuildid": build_id, "createdby": CREATED_BY}


async def read_log(uri: str, offset: int = 0) -> bytes:
    """The bytes of a build log from ``offset`` on (empty when there are none yet), for ``kiln logs --follow``.

    A local (Azurite) log is read with the local account key, an Azure one with the caller's Azure identity.
    """
    where = _split_blob_url(uri)
    if where and where[0] in azurite.local_accounts():
        async with BlobClient.from_blob_url(uri, credential=azurite.credential(where[0])) as blob:
            return await _read_from(blob, offset)
    from azure.identity.aio import DefaultAzureCredential

    async with DefaultAzureCredential() as identity, BlobClient.from_blob_url(uri, credential=identity) as blob:
        return await _read_from(blob, offset)


async def _read_from(blob: BlobClient, offset: int) -> bytes:
    try:
        return await (await blob.download_blob(offset=offset)).readall()
    except ResourceNotFoundError:
        return b""
    except HttpResponseError as err:
        if err.status_code == 416:  # nothing past offset yet
            return b""
        raise


class LocalStorage:
    """Staging storage, logs and distribution of the local cloud, on Azurite (see the module docstring)."""

    def __init__(self, *, store: ResourceStore, endpoint: str | None = None) -> None:
        self.store = store
        self.endpoint = (endpoint or azurite.endpoint()).rstrip("/")
        self._services: dict[str, BlobServiceClient] = {}

    async def close(self) -> None:
        for service in self._services.values():
            await service.close()
        self._services.clear()

    async def __aenter__(self) -> LocalStorage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- clients and records

    def _service(self, account: str) -> BlobServiceClient:
        if account not in self._services:
            self._services[account] = BlobServiceClient(
                azurite.account_url(account, base=self.endpoint), credential=azurite.credential(account)
            )
        return self._services[account]

    def _blob(self, account: str, container: str, name: str) -> BlobClient:
        return self._service(account).get_blob_client(container, name)

    def _blob_at(self, url: str) -> BlobClient:
        where = _split_blob_url(url)
        if where is None or where[0] not in azurite.local_accounts():
            raise PermanentError(f"'{url}' is not a blob of the local storage accounts", kind="BadBlobUri")
        return self._blob(*where)

    async def _ensure_container(self, account: str, container: str) -> None:
        with suppress(ResourceExistsError):
            await self._service(account).create_container(container)

    async def _db(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store call off the event loop: sqlite waits on disk and on other processes' locks."""
        return await asyncio.to_thread(call, *args, **kwargs)

    async def _record_blob(self, url: str, build_id: str, *, tags: dict[str, str], data: dict[str, Any]) -> None:
        """Record a blob before it is written: a worker that dies between the two leaves nothing unrecorded."""
        await self._db(self.store.record, url, kind=KIND_BLOB, build_id=build_id, tags=tags, data=data)

    async def _delete_blob(self, url: str) -> None:
        with suppress(ResourceNotFoundError):
            await self._blob_at(url).delete_blob(delete_snapshots="include")

    # ---- staging

    def _staging_group_id(self, build: BuildContext) -> str:
        if build.staging_resource_group:
            if not _GROUP_ID.match(build.staging_resource_group):
                raise PermanentError(
                    f"properties.stagingResourceGroup: '{build.staging_resource_group}' is not a resource group id "
                    "(/subscriptions/<subscription>/resourceGroups/<name>)",
                    kind="BadStagingResourceGroup",
                )
            return build.staging_resource_group
        return f"/subscriptions/{LOCAL_SUBSCRIPTION}/resourceGroups/{staging_group_name(build)}"

    def _staging_container(self, build: BuildContext) -> str:
        return _container_name("staging", build.build_id)

    def _log_prefix(self, build: BuildContext) -> str:
        return f"{azurite.account_url(azurite.STAGING_ACCOUNT, base=self.endpoint)}/{LOGS_CONTAINER}/{build.build_id}/"

    async def create_staging(self, build: BuildContext) -> Staging:
        """The staging group (a record) and the build's staging container. A named group that already exists is
        used but never taken over: only what kiln makes in it is deleted afterwards."""
        group_id = self._staging_group_id(build)
        tags = kiln_tags(build.build_id, role=ROLE_TEMPORARY, extra=build.managed_resource_tags)
        existing = await self._db(self.store.get, _key(group_id))
        created_group = existing is None or existing.build_id == build.build_id
        if created_group:
            await self._db(
                self.store.record,
                _key(group_id),
                kind=KIND_GROUP,
                build_id=build.build_id,
                tags=tags,
                data={"id": group_id, "location": build.location},
            )
        container = self._staging_container(build)
        container_url = f"{azurite.account_url(azurite.STAGING_ACCOUNT, base=self.endpoint)}/{container}"
        await self._db(
            self.store.record,
            container_url,
            kind=KIND_CONTAINER,
            build_id=build.build_id,
            tags=tags,
            data={"resourceGroup": group_id},
        )
        with suppress(ResourceExistsError):
            await self._service(azurite.STAGING_ACCOUNT).create_container(
                container, metadata=_blob_metadata(build.build_id)
            )
        await self._ensure_container(azurite.STAGING_ACCOUNT, LOGS_CONTAINER)
        resources = [Resource(id=container_url, kind=KIND_CONTAINER, owner="staging")]
        if created_group:
            resources.insert(0, Resource(id=group_id, kind=KIND_GROUP, owner="staging"))
        return Staging(
            resource_group_id=group_id,
            created_group=created_group,
            storage_uri=container_url,
            log_uri_prefix=self._log_prefix(build),
            resources=resources,
        )

    async def delete_staging(self, build: BuildContext) -> None:
        """Delete the staging container and, if kiln made it, the group. The logs stay, as AIB keeps them.

        Everything is found from the build alone, so this works when create_staging never returned.
        """
        container = self._staging_container(build)
        with suppress(ResourceNotFoundError):
            await self._service(azurite.STAGING_ACCOUNT).delete_container(container)
        container_url = f"{azurite.account_url(azurite.STAGING_ACCOUNT, base=self.endpoint)}/{container}"
        for record in await self._db(self.store.list, build_id=build.build_id, kind=KIND_BLOB):
            if record.data.get("container") == container_url:
                await self._db(self.store.forget, record.id)
        await self._db(self.store.forget, container_url)
        group = await self._db(self.store.get, _key(self._staging_group_id(build)))
        if group is not None and group.build_id == build.build_id:
            await self._db(self.store.forget, group.id)

    async def stage_artifact(
        self, build: BuildContext, staging: Staging, artifact: Artifact, data: bytes
    ) -> StagedArtifact:
        digest = hashlib.sha256(data).hexdigest()
        name = f"{re.sub(r'[^A-Za-z0-9._-]+', '-', artifact.field).strip('-')}-{digest[:12]}"
        blob = self._blob_at(f"{staging.storage_uri}/{name}")
        await self._record_blob(
            blob.url,
            build.build_id,
            tags=kiln_tags(build.build_id, role=ROLE_TEMPORARY, extra=build.managed_resource_tags),
            data={"container": staging.storage_uri, "sourceUri": artifact.source_uri},
        )
        await blob.upload_blob(data, overwrite=True, metadata=_blob_metadata(build.build_id))
        return StagedArtifact(source_uri=artifact.source_uri, staged_uri=blob.url, sha256=digest, size=len(data))

    async def read_staged(self, build: BuildContext, staged: StagedArtifact) -> bytes:
        return await (await self._blob_at(staged.staged_uri).download_blob()).readall()

    async def open_log(self, build: BuildContext, staging: Staging, name: str) -> AppendLog:
        blob = self._blob_at(f"{staging.log_uri_prefix.rstrip('/')}/{name}")
        await self._record_blob(
            blob.url,
            build.build_id,
            tags=kiln_tags(build.build_id, role=ROLE_LOG, extra=build.managed_resource_tags),
            data={"container": LOGS_CONTAINER},
        )
        await self._ensure_container(azurite.STAGING_ACCOUNT, LOGS_CONTAINER)
        return await AppendLog.open(blob, metadata=_blob_metadata(build.build_id))

    # ---- page uploads

    async def _send_used_pages(
        self, path: Path, blobs: list[BlobClient], *, start: int, on_batch: Callable[[int], None]
    ) -> int:
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
                await _all(put(blob, offset, data) for blob in blobs for offset, data in batch)
                sent += sum(len(data) for _, data in batch)
                on_batch(position)
        finally:
            with suppress(Exception, asyncio.CancelledError):
                await ahead  # the reading thread must finish before its file is closed
            reader.close()

    async def _resumable(self, blob: BlobClient, size: int, build_id: str) -> bool:
        """Whether ``blob`` is this build's unfinished upload of the right size, to carry on with."""
        try:
            props = await blob.get_blob_properties()
        except ResourceNotFoundError:
            return False
        return props.size == size and props.metadata.get("kilnbuildid") == build_id

    async def _upload(
        self,
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
        if resume_offset <= 0 or not all(await asyncio.gather(*(self._resumable(b, size, build_id) for b in blobs))):
            resume_offset = 0
            for blob in blobs:
                await blob.create_page_blob(size, metadata=_blob_metadata(build_id))
        return await self._send_used_pages(path, blobs, start=resume_offset, on_batch=progress)

    # ---- distribution

    async def distribute(
        self,
        request: DistributeRequest,
        *,
        resume: dict[str, Any] | None,
        progress: Callable[[dict[str, Any]], None],
    ) -> RunOutput:
        # The caller may hand its live checkpoint in as ``resume`` and rewrite it on each progress call.
        resume = dict(resume or {})
        target = request.target
        if isinstance(target, VhdDistributor):
            return await self._distribute_vhd(request, target, resume, progress)
        if isinstance(target, ManagedImageDistributor):
            return await self._distribute_managed_image(request, target, resume, progress)
        return await self._distribute_shared_image(request, target, resume, progress)

    def _output_data(self, request: DistributeRequest, **data: Any) -> dict[str, Any]:
        """Record data that ties an output to its target, for delete_output."""
        return {"targetIndex": request.index, "runOutputName": request.target.run_output_name, **data}

    def _output_tags(self, request: DistributeRequest) -> dict[str, str]:
        return kiln_tags(request.build.build_id, role=ROLE_OUTPUT, extra=request.target.artifact_tags)

    async def _distribute_vhd(
        self, request: DistributeRequest, target: VhdDistributor, resume: dict[str, Any], progress: Callable
    ) -> RunOutput:
        build = request.build
        field = f"properties.distribute[{request.index}].uri"
        if target.uri:
            where = _split_blob_url(target.uri)
            if where is None or where[0] not in azurite.local_accounts():
                raise PermanentError(
                    f"{field}: '{target.uri}' is not a blob URL of a local storage account; local blobs look like "
                    f"{azurite.account_url(azurite.STAGING_ACCOUNT, base=self.endpoint)}/<container>/<name>.vhd",
                    kind="BadDistributeType",
                )
            account, container, name = where
        else:
            account, container = azurite.STAGING_ACCOUNT, VHD_CONTAINER
            name = f"{build.template_name}/{build.build_id}/{target.run_output_name}.vhd"
        blob = self._blob(account, container, name)
        await self._ensure_container(account, container)
        with suppress(ResourceNotFoundError):
            owner = (await blob.get_blob_properties()).metadata.get("kilnbuildid")
            if owner != build.build_id:
                raise PermanentError(f"{field}: a blob already exists at {blob.url}", kind="BlobAlreadyExists")
        path = _file_path(request.image.uri)
        await self._record_blob(
            blob.url,
            build.build_id,
            tags=self._output_tags(request),
            data=self._output_data(request, state=CREATING, container=f"{account}/{container}"),
        )
        sent = await self._upload(
            path,
            [blob],
            build_id=build.build_id,
            resume_offset=int(resume.get("offset", 0)),
            progress=lambda offset: progress({"offset": offset}),
        )
        await self._db(self.store.update, blob.url, {"state": SUCCEEDED, "sentBytes": sent})
        return RunOutput(run_output_name=target.run_output_name, type="VHD", artifact_uri=blob.url)

    async def _distribute_managed_image(
        self, request: DistributeRequest, target: ManagedImageDistributor, resume: dict[str, Any], progress: Callable
    ) -> RunOutput:
        build = request.build
        field = f"properties.distribute[{request.index}]"
        m = _MANAGED_IMAGE_ID.match(target.image_id)
        if not m:
            raise PermanentError(
                f"{field}.imageId: '{target.image_id}' is not a managed image id "
                "(/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/images/<name>)",
                kind="BadDistributeType",
            )
        account = azurite.account_for_region(target.location, field=f"{field}.location")
        region = azurite.normalize_region(target.location)
        previous = await self._db(self.store.get, _key(target.image_id))
        if previous is not None and previous.build_id != build.build_id and previous.data.get("location") != region:
            raise PermanentError(
                f"{field}.location: the image {target.image_id} exists in {previous.data.get('location')}, "
                f"not {target.location}",
                kind="BadDistributeType",
            )
        await self._ensure_container(account, IMAGES_CONTAINER)
        name = f"{m['sub']}/{m['rg']}/{m['name']}-{_short_id(build.build_id)}.vhd".lower()
        blob = self._blob(account, IMAGES_CONTAINER, name)
        await self._record_blob(
            blob.url,
            build.build_id,
            tags=self._output_tags(request),
            data=self._output_data(request, state=CREATING, parent=_key(target.image_id)),
        )
        await self._upload(
            _file_path(request.image.uri),
            [blob],
            build_id=build.build_id,
            resume_offset=int(resume.get("offset", 0)),
            progress=lambda offset: progress({"offset": offset}),
        )
        await self._db(self.store.update, blob.url, {"state": SUCCEEDED})
        await self._db(
            self.store.record,
            _key(target.image_id),
            kind=KIND_MANAGED_IMAGE,
            build_id=build.build_id,
            tags=self._output_tags(request),
            data=self._output_data(
                request,
                id=target.image_id,
                state=SUCCEEDED,
                location=region,
                blobUrl=blob.url,
                osType=request.source.os_type,
                hyperVGeneration=request.image.hyper_v_generation,
                sizeBytes=request.image.size_bytes,
            ),
        )
        # The image was made again at the same id: what it replaced goes.
        if previous is not None and previous.data.get("blobUrl") not in (None, blob.url):
            await self._delete_blob(previous.data["blobUrl"])
            await self._db(self.store.forget, previous.data["blobUrl"])
        return RunOutput(run_output_name=target.run_output_name, type="ManagedImage", artifact_id=target.image_id)

    async def check_targets(self, template: ImageTemplate, source: ResolvedSource) -> None:
        """Refuse, before a build makes anything, a target it could not distribute to at its end: a region with no
        local storage account, a gallery or image definition that does not exist or does not fit the image."""
        for index, target in enumerate(template.properties.distribute):
            field = f"properties.distribute[{index}]"
            if isinstance(target, ManagedImageDistributor):
                azurite.account_for_region(target.location, field=f"{field}.location")
            elif isinstance(target, SharedImageDistributor):
                await self._gallery_target(index, target, source.hyper_v_generation, source.os_type)
                region_field = "targetRegions" if target.target_regions is not None else "replicationRegions"
                for i, region in enumerate(target.regions()):
                    azurite.account_for_region(region.name, field=f"{field}.{region_field}[{i}].name")

    async def _gallery_target(
        self, index: int, target: SharedImageDistributor, hyper_v_generation: str, os_type: str
    ) -> tuple[_GalleryRef, ResourceRecord]:
        """The image definition a SharedImage target writes to; it and its gallery must exist, as on Azure."""
        field = f"properties.distribute[{index}].galleryImageId"
        ref = _gallery_ref(target.gallery_image_id)
        if ref is None or ref.image is None:
            raise PermanentError(
                f"{field}: '{target.gallery_image_id}' is not an image definition id "
                "(/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/galleries/<gallery>"
                "/images/<definition>, optionally /versions/<x.y.z>)",
                kind="BadSharedImageDistribute",
            )
        if await self._db(self.store.get, _key(ref.gallery_id)) is None:
            raise PermanentError(
                f"{field}: the gallery {ref.gallery_id} does not exist. A gallery and image definition must exist "
                f"before a build writes to them; make them with `kiln gallery create {ref.image_id}`",
                kind="BadSharedImageDistribute",
            )
        definition = await self._db(self.store.get, _key(ref.image_id))
        if definition is None:
            raise PermanentError(
                f"{field}: the image definition {ref.image_id} does not exist in gallery {ref.gallery}. "
                f"Make it with `kiln gallery create {ref.image_id}`",
                kind="BadSharedImageDistribute",
            )
        if definition.data.get("hyperVGeneration") != hyper_v_generation:
            raise PermanentError(
                f"{field}: the image is Hyper-V generation {hyper_v_generation}, but the image "
                f"definition {ref.image_id} is {definition.data.get('hyperVGeneration')}",
                kind="BadSharedImageDistribute",
            )
        if definition.data.get("osType") != os_type:
            raise PermanentError(
                f"{field}: the image is {os_type}, the image definition {ref.image_id} is "
                f"{definition.data.get('osType')}",
                kind="BadSharedImageDistribute",
            )
        return ref, definition

    async def _claim_version(
        self, request: DistributeRequest, target: SharedImageDistributor, ref: _GalleryRef, regions: dict[str, Any]
    ) -> ResourceRecord:
        """The version record this target writes: the one an earlier try of it claimed, or a new one numbered by the
        template's versioning. Claiming is atomic, so two builds never number the same version."""
        build = request.build
        field = f"properties.distribute[{request.index}]"
        for record in await self._db(self.store.list, build_id=build.build_id, kind=KIND_IMAGE_VERSION):
            if record.data.get("targetIndex") == request.index and record.data.get("imageDefinition") == _key(
                ref.image_id
            ):
                return record
        data = self._output_data(
            request,
            imageDefinition=_key(ref.image_id),
            state=CREATING,
            regions=regions,
            excludeFromLatest=target.exclude_from_latest,
            osType=request.source.os_type,
            hyperVGeneration=request.image.hyper_v_generation,
            sizeBytes=request.image.size_bytes,
            sourceImage=request.source.image_id,
            sourceVersion=request.source.exact_version,
        )
        versioning = target.versioning
        pinned: str | None = None
        if ref.version is not None:
            pinned, why = ref.version, f"{field}.galleryImageId"
        elif versioning is not None and versioning.scheme == "Source":
            pinned, why = request.source.exact_version, f"{field}.versioning.scheme"
        if pinned is not None:
            if parse_version(pinned) is None:
                raise PermanentError(
                    f"{why}: '{pinned}' is not a gallery image version (major.minor.patch, 32-bit integers)",
                    kind="BadSharedImageDistribute",
                )
            record = await self._claim(ref, pinned, request, data)
            if record.build_id != build.build_id:
                raise PermanentError(
                    f"{why}: version {pinned} of {ref.image_id} already exists", kind="BadSharedImageDistribute"
                )
            return record
        major = versioning.major if versioning is not None else -1
        while True:  # another build may claim the number first; then take the next one
            existing = [r.data["version"] for r in await self._versions(ref)]
            record = await self._claim(ref, next_version(existing, major), request, data)
            if record.build_id == build.build_id:
                return record

    async def _claim(
        self, ref: _GalleryRef, version: str, request: DistributeRequest, data: dict[str, Any]
    ) -> ResourceRecord:
        return await self._db(
            self.store.claim,
            _key(ref.version_id(version)),
            kind=KIND_IMAGE_VERSION,
            build_id=request.build.build_id,
            tags=self._output_tags(request),
            data={**data, "id": ref.version_id(version), "version": version},
        )

    async def _versions(self, ref: _GalleryRef) -> list[ResourceRecord]:
        """Every version of an image definition, finished or not."""
        records = await self._db(self.store.list, kind=KIND_IMAGE_VERSION)
        return [r for r in records if r.data.get("imageDefinition") == _key(ref.image_id)]

    async def _distribute_shared_image(
        self, request: DistributeRequest, target: SharedImageDistributor, resume: dict[str, Any], progress: Callable
    ) -> RunOutput:
        build = request.build
        field = f"properties.distribute[{request.index}]"
        ref, _ = await self._gallery_target(
            request.index, target, request.image.hyper_v_generation, request.source.os_type
        )
        region_field = "targetRegions" if target.target_regions is not None else "replicationRegions"
        plan: dict[str, dict[str, Any]] = {}
        for i, region in enumerate(target.regions()):
            account = azurite.account_for_region(region.name, field=f"{field}.{region_field}[{i}].name")
            plan[azurite.normalize_region(region.name)] = {
                "name": region.name,
                "account": account,
                "replicaCount": max(region.replica_count, 1),
                "storageAccountType": region.storage_account_type,
                "status": "Pending",
            }
        record = await self._claim_version(request, target, ref, plan)
        version = record.data["version"]
        for key, entry in plan.items():
            entry["blobs"] = [
                self._blob(
                    entry["account"],
                    GALLERY_CONTAINER,
                    f"{ref.version_id(version).lower().lstrip('/')}/replica-{n}.vhd",
                ).url
                for n in range(entry["replicaCount"])
            ]
            before = record.data.get("regions", {}).get(key, {})
            if before.get("status") == COMPLETED and before.get("blobs") == entry["blobs"]:
                entry["status"] = COMPLETED
        path = _file_path(request.image.uri)
        size = (await asyncio.to_thread(path.stat)).st_size
        # A region counts as done only if its replicas are still there in full.
        for entry in plan.values():
            if entry["status"] == COMPLETED:
                for url in entry["blobs"]:
                    if not await self._resumable(self._blob_at(url), size, build.build_id):
                        entry["status"] = "Pending"
        for entry in plan.values():
            for url in entry["blobs"]:
                await self._record_blob(
                    url,
                    build.build_id,
                    tags=self._output_tags(request),
                    data=self._output_data(request, state=CREATING, parent=record.id),
                )
        await self._db(self.store.update, record.id, {"regions": plan})

        def checkpoint(offset: int) -> dict[str, Any]:
            done = sorted(k for k, e in plan.items() if e["status"] == COMPLETED)
            return {"version": version, "offset": offset, "completed": done}

        pending = {k: e for k, e in plan.items() if e["status"] != COMPLETED}
        if pending:
            for entry in pending.values():
                await self._ensure_container(entry["account"], GALLERY_CONTAINER)
            offset = int(resume.get("offset", 0)) if resume.get("version") == version else 0
            firsts = [self._blob_at(e["blobs"][0]) for e in pending.values()]
            await self._upload(
                path,
                firsts,
                build_id=build.build_id,
                resume_offset=offset,
                progress=lambda at: progress(checkpoint(at)),
            )

            async def finish(entry: dict[str, Any]) -> None:
                await self._finish_region(entry)
                entry["status"] = COMPLETED
                await self._db(self.store.update, record.id, {"regions": plan})
                progress(checkpoint(size))

            # A region that fails does not stop the others: what they finish, a retry skips.
            results = await asyncio.gather(*(finish(e) for e in pending.values()), return_exceptions=True)
            if failed := next((r for r in results if isinstance(r, BaseException)), None):
                raise failed
        for entry in plan.values():
            for url in entry["blobs"]:
                await self._db(self.store.update, url, {"state": SUCCEEDED})
        await self._db(self.store.update, record.id, {"state": SUCCEEDED, "regions": plan})
        return RunOutput(
            run_output_name=target.run_output_name,
            type="SharedImage",
            artifact_id=record.data["id"],
            replication={e["name"]: e["status"] for e in plan.values()},
        )

    async def _finish_region(self, entry: dict[str, Any]) -> None:
        """Copy a region's first replica to its other replicas: server-side, within the region's account."""
        first = self._blob_at(entry["blobs"][0])
        for url in entry["blobs"][1:]:
            copy = self._blob_at(url)
            await copy.start_copy_from_url(first.url)
            while (props := await copy.get_blob_properties()).copy.status == "pending":
                await asyncio.sleep(0.5)
            if props.copy.status != "success":
                raise RuntimeError(
                    f"copying {first.url} to {url} ended {props.copy.status}: {props.copy.status_description}"
                )

    async def delete_output(self, build: BuildContext, target: Distributor, index: int) -> None:
        """Delete the blobs and records an unfinished distribution of this target left; finished outputs stay."""
        records = await self._db(self.store.list, build_id=build.build_id)
        mine = [
            r
            for r in records
            if r.data.get("targetIndex") == index
            and r.data.get("runOutputName") == target.run_output_name
            and r.data.get("state") != SUCCEEDED
        ]
        for record in sorted(mine, key=lambda r: r.kind != KIND_BLOB):  # blobs before the records that own them
            if record.kind == KIND_BLOB:
                await self._delete_blob(record.id)
            await self._db(self.store.forget, record.id)

    # ---- images as sources

    async def locate_image(self, image_id: str) -> LocalImage:
        """The VHD of a local managed image or gallery version (``.../versions/latest`` is the highest version not
        excluded from latest), downloaded once into the image cache."""
        if _MANAGED_IMAGE_ID.match(image_id):
            record = await self._db(self.store.get, _key(image_id))
            if record is None or record.data.get("state") != SUCCEEDED:
                known = [r.data.get("id", r.id) for r in await self._db(self.store.list, kind=KIND_MANAGED_IMAGE)]
                raise PermanentError(
                    f"properties.source.imageId: there is no local managed image {image_id}; local managed images: "
                    f"{', '.join(known) or 'none'}",
                    kind="BadManagedImageSource",
                )
            path = await self._download(record.data["blobUrl"])
            # A managed image has no version; the build that made it pins what it holds.
            return LocalImage(path, record.build_id or "", record.data["hyperVGeneration"])
        ref = _gallery_ref(image_id)
        if ref is None or ref.image is None or ref.version is None:
            raise PermanentError(
                f"properties.source.imageVersionId: '{image_id}' is not a gallery image version id "
                "(.../galleries/<gallery>/images/<definition>/versions/<x.y.z or latest>)",
                kind="BadSharedImageVersionSource",
            )
        versions = [r for r in await self._versions(ref) if r.data.get("state") == SUCCEEDED]
        if ref.version.lower() == "latest":
            candidates = [r for r in versions if not r.data.get("excludeFromLatest")]
            found = max(candidates, key=lambda r: parse_version(r.data["version"]) or (0, 0, 0), default=None)
        else:
            found = next((r for r in versions if r.data["version"] == ref.version), None)
        if found is None:
            names = sorted((r.data["version"] for r in versions), key=lambda v: parse_version(v) or (0, 0, 0))
            raise PermanentError(
                f"properties.source.imageVersionId: no version '{ref.version}' of {ref.image_id}"
                f"{' that is not excluded from latest' if ref.version.lower() == 'latest' else ''}; "
                f"versions: {', '.join(names) or 'none'}",
                kind="BadSharedImageVersionSource",
            )
        region = next(e for e in found.data["regions"].values() if e["status"] == COMPLETED)
        path = await self._download(region["blobs"][0])
        return LocalImage(path, found.data["version"], found.data["hyperVGeneration"])

    async def _download(self, url: str) -> Path:
        """A local copy of an image blob, fetched once: only its used pages are read, the rest stays a hole."""
        cache = state_dir() / "image-cache"
        path = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.vhd"
        if await asyncio.to_thread(path.exists):
            return path
        blob = self._blob_at(url)
        try:
            size = (await blob.get_blob_properties()).size
        except ResourceNotFoundError as err:
            raise PermanentError(
                f"the image's blob {url} is gone from local storage", kind="SourceImageNotFound"
            ) from err
        await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
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
            await _all(fetch(offset, length) for offset, length in pieces)
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            raise
        finally:
            await asyncio.to_thread(os.close, fd)
        await asyncio.to_thread(os.replace, partial, path)  # whole or absent, even to a reader in another process
        return path

    # ---- galleries (`kiln gallery create`) and the resource list (`kiln resources`)

    async def create_gallery(self, gallery_id: str, *, location: str = azurite.REGIONS[0]) -> ResourceRecord:
        """Make a local gallery, or return the one that exists."""
        ref = _gallery_ref(gallery_id)
        if ref is None or ref.image is not None:
            raise PermanentError(
                f"'{gallery_id}' is not a gallery id "
                "(/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/galleries/<name>)",
                kind="BadGalleryId",
            )
        azurite.account_for_region(location, field="location")
        return await self._db(
            self.store.claim,
            _key(gallery_id),
            kind=KIND_GALLERY,
            build_id=None,
            tags={TAG_CREATED_BY: CREATED_BY},
            data={"id": gallery_id, "location": azurite.normalize_region(location)},
        )

    async def create_image_definition(
        self,
        image_definition_id: str,
        *,
        os_type: str = "Linux",
        hyper_v_generation: str = "V2",
        publisher: str,
        offer: str,
        sku: str,
    ) -> ResourceRecord:
        """Make an image definition in an existing local gallery, or return the one that exists."""
        ref = _gallery_ref(image_definition_id)
        if ref is None or ref.image is None or ref.version is not None:
            raise PermanentError(
                f"'{image_definition_id}' is not an image definition id (.../galleries/<gallery>/images/<name>)",
                kind="BadGalleryId",
            )
        gallery = await self._db(self.store.get, _key(ref.gallery_id))
        if gallery is None:
            raise PermanentError(f"the gallery {ref.gallery_id} does not exist; make it first", kind="BadGalleryId")
        if os_type not in ("Linux", "Windows") or hyper_v_generation not in ("V1", "V2"):
            raise PermanentError(
                f"osType must be Linux or Windows and hyperVGeneration V1 or V2, not {os_type}/{hyper_v_generation}",
                kind="InvalidParameter",
            )
        return await self._db(
            self.store.claim,
            _key(image_definition_id),
            kind=KIND_IMAGE_DEFINITION,
            build_id=None,
            tags={TAG_CREATED_BY: CREATED_BY},
            data={
                "id": image_definition_id,
                "gallery": _key(ref.gallery_id),
                "location": gallery.data["location"],
                "osType": os_type,
                "hyperVGeneration": hyper_v_generation,
                "identifier": {"publisher": publisher, "offer": offer, "sku": sku},
            },
        )

    async def list_gallery(self, gallery_id: str | None = None) -> list[ResourceRecord]:
        """Galleries, image definitions and versions (of one gallery, or all), in id order."""
        prefix = _key(gallery_id.rstrip("/")) if gallery_id else ""
        records: list[ResourceRecord] = []
        for kind in (KIND_GALLERY, KIND_IMAGE_DEFINITION, KIND_IMAGE_VERSION):
            records += await self._db(self.store.list, kind=kind)
        return sorted(
            (r for r in records if r.id == prefix or r.id.startswith(f"{prefix}/") or not prefix),
            key=lambda r: (r.id.rsplit("/versions/", 1)[0], parse_version(r.data.get("version", "")) or (0, 0, 0)),
        )

    async def list_resources(
        self, orphans_only: bool = False, *, active_builds: Collection[str] = ()
    ) -> list[ResourceRecord]:
        """Every recorded resource, or only the orphans: temporary resources of a build not in ``active_builds``
        (the builds whose workflows are open). Outputs, logs and galleries are never orphans."""
        records = await self._db(self.store.list)
        if not orphans_only:
            return records
        return [
            r
            for r in records
            if r.build_id and r.build_id not in active_builds and r.tags.get(TAG_ROLE, ROLE_TEMPORARY) == ROLE_TEMPORARY
        ]
