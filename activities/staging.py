"""The staging group and storage, and the artifacts (scriptUri, sourceUri) fetched, checked and staged in it."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from temporalio import activity

from activities.clouds.base import PermanentError
from activities.common import CloudActivities, heartbeating, undoing
from workflows.models import BuildContext, DeleteRequest, StageArtifactsRequest, StagedArtifact, Staging

MAX_ARTIFACT_BYTES = 256 * 1024 * 1024


class StagingActivities(CloudActivities):
    @activity.defn
    async def create_staging(self, build: BuildContext) -> Staging:
        async with heartbeating():
            return await self.cloud.create_staging(build)

    @activity.defn
    async def delete_staging(self, request: DeleteRequest) -> None:
        async with undoing():
            await self.cloud.delete_staging(request.build)

    @activity.defn
    async def stage_artifacts(self, request: StageArtifactsRequest) -> list[StagedArtifact]:
        staged = []
        async with heartbeating():
            for artifact in request.artifacts:
                data = await fetch(artifact.source_uri, field=artifact.field)
                digest = hashlib.sha256(data).hexdigest()
                if artifact.sha256 and digest != artifact.sha256.lower():
                    raise PermanentError(
                        f"{artifact.field}: sha256 of {artifact.source_uri} is {digest}, "
                        f"but the template's sha256Checksum is {artifact.sha256}",
                        kind="ChecksumMismatch",
                    )
                staged.append(await self.cloud.stage_artifact(request.build, request.staging, artifact, data))
        return staged


async def fetch(uri: str, *, field: str) -> bytes:
    """Fetch a scriptUri or sourceUri (https, http or file). A 4xx or a bad URI is permanent; the rest is retried."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise PermanentError(f"{field}: {uri} does not exist", kind="ArtifactNotFound") from None
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise PermanentError(f"{field}: '{uri}' is not an http(s) or file URI", kind="InvalidArtifactUri")

    def download() -> bytes:
        with urllib.request.urlopen(uri, timeout=60) as response:
            data = response.read(MAX_ARTIFACT_BYTES + 1)
        if len(data) > MAX_ARTIFACT_BYTES:
            raise PermanentError(f"{field}: {uri} is larger than {MAX_ARTIFACT_BYTES} bytes", kind="ArtifactTooLarge")
        return data

    try:
        return await asyncio.to_thread(download)
    except urllib.error.HTTPError as err:
        if 400 <= err.code < 500 and err.code not in (408, 429):
            raise PermanentError(
                f"{field}: fetching {uri} failed: HTTP {err.code} {err.reason}", kind="ArtifactNotFound"
            ) from err
        raise
