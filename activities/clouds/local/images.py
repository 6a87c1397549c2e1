"""The local marketplace: Debian base images like Azure's own, and images earlier local builds produced.

A base (``base_image.py``) is made once per Debian release and kept in the state folder under a date-based
version (``0.20261126.1``), so ``latest`` pins to the newest one kept and a template can name an exact one. A base
older than the configured age (``KILN_BASE_MAX_AGE_DAYS``, 30 days by default) is made again, as a new version,
when ``latest`` is next asked for; ``rebuild`` makes one on request. Images from earlier builds (ManagedImage and
SharedImageVersion sources) are bootable fixed VHDs; each one's root filesystem is unpacked once into the cache
and then used like a base.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from activities.clouds.aib.ids import parse_platform_image_id, platform_image_id
from activities.clouds.aib.versions import version_key
from activities.clouds.base import PermanentError
from activities.clouds.local.base_image import RECIPE, make_debian_base
from activities.clouds.local.disks import unpack_root
from activities.clouds.local.host import end_what_runs_in, file_lock
from workflows.models import ResolvedSource
from workflows.template import PlatformImageSource

PUBLISHER = "Debian"
MAPPING_FILE = "local-images.json"
# Azure's Debian images have 30 GiB OS disks; a base's disk is as large (it is sparse until written).
BASE_DISK_BYTES = 30 << 30
DEFAULT_MAX_AGE = datetime.timedelta(days=int(os.environ.get("KILN_BASE_MAX_AGE_DAYS", "30")))
# How many versions of a release are kept: older ones go when a new one is made, unless a VM still runs on one.
DEFAULT_KEEP = int(os.environ.get("KILN_BASE_KEEP", "3"))

_VERSION = re.compile(r"0\.(\d{8})\.(\d+)")
# The subscription in the ids of local platform images, which only they use.
PLATFORM_SUBSCRIPTION = "local"


@dataclass(frozen=True)
class LocalOffer:
    offer: str
    sku: str
    suite: str
    hyper_v_generation: str

    @property
    def urn(self) -> str:
        return f"{PUBLISHER}:{self.offer}:{self.sku}"


# The offers and skus of Azure's own Debian images, so a Debian template runs here unchanged.
OFFERS = [
    LocalOffer("debian-12", "12", "bookworm", "V1"),
    LocalOffer("debian-12", "12-gen2", "bookworm", "V2"),
    LocalOffer("debian-13", "13", "trixie", "V1"),
    LocalOffer("debian-13", "13-gen2", "trixie", "V2"),
]


@dataclass(frozen=True)
class BaseImage:
    offer: LocalOffer
    version: str
    rootfs: Path
    size_bytes: int

    def image_id(self, location: str) -> str:
        """An id shaped like Azure's platform image ids, which ``platform_image_version`` reads back."""
        return platform_image_id(
            PLATFORM_SUBSCRIPTION, location, PUBLISHER, self.offer.offer, self.offer.sku, self.version
        )


def find_offer(offer: str, sku: str) -> LocalOffer | None:
    return next((o for o in OFFERS if o.offer.lower() == offer.lower() and o.sku.lower() == sku.lower()), None)


def platform_image_version(image_id: str) -> tuple[LocalOffer, str] | None:
    """The offer and version a local platform image id names, or None for any other id."""
    ref = parse_platform_image_id(image_id)
    if ref is None or ref.subscription != PLATFORM_SUBSCRIPTION:
        return None
    offer = find_offer(ref.offer, ref.sku)
    return (offer, ref.version) if offer is not None else None


BaseBuilder = Callable[[LocalOffer, Path, Path], Awaitable[None]]


async def mmdebstrap_base(offer: LocalOffer, rootfs: Path, log: Path) -> None:
    """Make the base of ``offer``'s Debian release from the Debian package registry."""
    await make_debian_base(offer.suite, rootfs, log)


class ImageCache:
    """Base images by offer and version, and unpacked VHDs, under ``<state>/images``.

    Args:
        max_age: a base older than this is made again when ``latest`` is next resolved (None: never).
        keep: how many versions of a release stay once a new one is made.
        in_use: whether a VM runs on a base's root filesystem (its overlay's lower layer): such a base stays.
    """

    def __init__(
        self,
        root: Path,
        *,
        builder: BaseBuilder = mmdebstrap_base,
        max_age: datetime.timedelta | None = DEFAULT_MAX_AGE,
        keep: int = DEFAULT_KEEP,
        in_use: Callable[[Path], bool] = lambda rootfs: False,
    ) -> None:
        self.root = root
        self._builder = builder
        self._max_age = max_age
        self._keep = max(1, keep)
        self._in_use = in_use

    def _suite_dir(self, offer: LocalOffer) -> Path:
        return self.root / "base" / offer.suite

    def versions(self, offer: LocalOffer) -> list[str]:
        """The versions of ``offer`` kept here, oldest first."""
        folder = self._suite_dir(offer)
        found = [p.name for p in folder.iterdir() if _VERSION.fullmatch(p.name)] if folder.is_dir() else []
        return sorted(found, key=version_key)

    def base(self, offer: LocalOffer, version: str) -> BaseImage:
        folder = self._suite_dir(offer) / version
        meta = json.loads((folder / "image.json").read_text())
        return BaseImage(offer=offer, version=version, rootfs=folder / "rootfs", size_bytes=meta["sizeBytes"])

    async def resolve(self, offer: LocalOffer, version: str) -> BaseImage:
        """Pin ``version`` (``latest`` or exact) to a kept base, making one if there is none, or if the newest is
        older than the maximum age.

        Concurrent builds wait on one lock per release, so a base is never made twice.
        """
        if version.lower() != "latest":
            if version not in self.versions(offer):
                kept = ", ".join(self.versions(offer)) or "none yet; use version 'latest' to make one"
                raise PermanentError(
                    f"properties.source.version: {offer.urn} has no local version '{version}' (kept: {kept})",
                    kind="SourceImageNotFound",
                )
            return self.base(offer, version)
        if (fresh := self.fresh(offer)) is not None:
            return fresh
        async with file_lock(self._suite_dir(offer).with_suffix(".lock")):
            if (fresh := self.fresh(offer)) is not None:  # another worker made it while this one waited
                return fresh
            return await self._make_base(offer)

    async def rebuild(self, offer: LocalOffer) -> BaseImage:
        """Make a new version of ``offer``'s base now, whatever the age of the newest (``kiln bases --rebuild``)."""
        async with file_lock(self._suite_dir(offer).with_suffix(".lock")):
            return await self._make_base(offer)

    def fresh(self, offer: LocalOffer) -> BaseImage | None:
        """What ``latest`` pins to: the newest kept base, unless there is none, it was made by an older recipe, or
        it is older than the maximum age (then ``latest`` makes a new one)."""
        versions = self.versions(offer)
        if not versions:
            return None
        newest = self.base(offer, versions[-1])
        if not self.current_recipe(newest):
            return None
        age = time.time() - self.made_at(newest).timestamp()
        if self._max_age is not None and age > self._max_age.total_seconds():
            return None
        return newest

    def made_at(self, base: BaseImage) -> datetime.datetime:
        return datetime.datetime.fromtimestamp((base.rootfs.parent / "image.json").stat().st_mtime, datetime.UTC)

    def current_recipe(self, base: BaseImage) -> bool:
        """Whether ``base`` holds what a base made now would (see ``base_image.RECIPE``)."""
        return json.loads((base.rootfs.parent / "image.json").read_text()).get("recipe") == RECIPE

    async def _make_base(self, offer: LocalOffer) -> BaseImage:
        folder = self._suite_dir(offer)
        version = _next_version(self.versions(offer))
        staging = folder / f".{version}.partial"
        # What a worker that died half-way left: its mmdebstrap may still run there, with mounts inside.
        await asyncio.to_thread(end_what_runs_in, staging)
        await asyncio.to_thread(shutil.rmtree, staging, True)
        staging.mkdir(parents=True)
        await self._builder(offer, staging / "rootfs", staging / "build.log")
        meta = {"urn": offer.urn, "version": version, "recipe": RECIPE, "sizeBytes": BASE_DISK_BYTES}
        (staging / "image.json").write_text(json.dumps(meta))
        staging.rename(folder / version)  # appears whole or not at all
        await self._prune(offer)
        return self.base(offer, version)

    async def _prune(self, offer: LocalOffer) -> None:
        """Remove the versions older than the newest ``keep``, but none that a VM runs on. A version is renamed
        out of the list before it is deleted, so no build pins one half gone."""
        folder = self._suite_dir(offer)
        for version in self.versions(offer)[: -self._keep]:
            if not self._in_use(folder / version / "rootfs"):
                (folder / version).rename(folder / f".{version}.deleting")
        for leaving in folder.glob(".*.deleting"):  # this one's, and what a worker that died meanwhile left
            await asyncio.to_thread(shutil.rmtree, leaving, True)

    def _unpacked_folder(self, vhd: Path) -> Path:
        """Where ``vhd`` is unpacked; a VHD replaced at the same path gets a folder of its own."""
        stat = vhd.stat()
        key = hashlib.sha256(f"{vhd.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]
        return self.root / "unpacked" / key

    async def forget_unpacked(self, vhd: Path) -> None:
        """Remove the unpacked copy of ``vhd``, before the VHD itself goes."""
        folder = self._unpacked_folder(vhd)
        async with file_lock(folder.with_suffix(".lock")):
            await asyncio.to_thread(shutil.rmtree, folder, True)
            folder.with_suffix(".lock").unlink(missing_ok=True)

    async def unpacked(self, vhd: Path) -> Path:
        """The root filesystem inside a fixed VHD from an earlier build, unpacked here once."""
        folder = self._unpacked_folder(vhd)
        key = folder.name
        if (folder / "rootfs").is_dir():
            return folder / "rootfs"
        async with file_lock(folder.with_suffix(".lock")):
            if (folder / "rootfs").is_dir():
                return folder / "rootfs"
            staging = folder.with_name(f".{key}.partial")
            await asyncio.to_thread(shutil.rmtree, staging, True)
            staging.mkdir(parents=True)
            await unpack_root(vhd, staging / "rootfs")
            staging.rename(folder)
        return folder / "rootfs"


def _next_version(existing: list[str]) -> str:
    today = datetime.date.today().strftime("%Y%m%d")
    same_day = [int(m[2]) for v in existing if (m := _VERSION.fullmatch(v)) and m[1] == today]
    return f"0.{today}.{max(same_day, default=0) + 1}"


async def resolve_platform_image(
    cache: ImageCache, source: PlatformImageSource, *, state: Path, location: str
) -> ResolvedSource:
    """Pin a PlatformImage source to a local base: Debian's own offers as they are, any other publisher only
    through the mapping in ``local-images.json``; refused before anything is made otherwise."""
    offer, sku, version = source.offer, source.sku, source.version or "latest"
    mapped_from = ""
    if source.publisher.lower() != PUBLISHER.lower():
        mapped = read_mapping(state).get(f"{source.publisher}:{offer}:{sku}".lower())
        if mapped is None:
            raise PermanentError(
                unknown_source_message(source.publisher, offer, sku, state), kind="SourceImageNotAvailable"
            )
        # The source's own version means nothing for another publisher's image: latest, unless the mapping pins one.
        offer, sku, version, *_ = [*mapped.split(":"), "latest"]
        mapped_from = f" (mapped from {source.publisher}:{source.offer}:{source.sku} in {state / MAPPING_FILE})"
    local = find_offer(offer, sku)
    if local is None:
        known = ", ".join(o.urn for o in OFFERS)
        field = "sku" if any(o.offer.lower() == offer.lower() for o in OFFERS) else "offer"
        raise PermanentError(
            f"properties.source.{field}: {PUBLISHER}:{offer}:{sku}{mapped_from} is not a local image "
            f"(local images: {known})",
            kind="SourceImageNotAvailable",
        )
    base = await cache.resolve(local, version)
    return ResolvedSource(
        image_id=base.image_id(location),
        exact_version=base.version,
        os_type="Linux",
        hyper_v_generation=local.hyper_v_generation,
        size_bytes=base.size_bytes,
    )


def read_mapping(state: Path) -> dict[str, str]:
    """``local-images.json``: ``{"Publisher:offer:sku": "debian-12:12-gen2"}``, keys matched without case."""
    path = state / MAPPING_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise PermanentError(f"{path} is not valid JSON: {err}", kind="InvalidConfiguration") from err
    return {key.lower(): value for key, value in raw.items()}


def unknown_source_message(publisher: str, offer: str, sku: str, state: Path) -> str:
    """Why a source cannot be built here, what can, and how to map the source to it for a local trial."""
    urn = f"{publisher}:{offer}:{sku}"
    lines = [f"properties.source: {urn} is not an image the local cloud has."]
    if publisher.lower().startswith("microsoftwindows"):
        lines.append(
            "The local cloud runs Linux guests only: Windows customizers (PowerShell, WindowsRestart, "
            "WindowsUpdate) need the azure cloud."
        )
    lines += [
        "The local cloud builds from these images (publisher:offer:sku):",
        *(f"  {o.urn} (Hyper-V generation {o.hyper_v_generation})" for o in OFFERS),
        f"To try this template locally, map its source to one of them in {state / MAPPING_FILE}",
        f'(value "offer:sku", or "offer:sku:version"), e.g. {{"{urn}": "debian-12:12-gen2"}},',
        "or build it on the azure cloud (task queue kiln-azure).",
    ]
    return "\n".join(lines)
