"""The local marketplace: Debian bases made once and cached, versions pinned, other publishers refused or mapped."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from activities.clouds.base import PermanentError
from activities.clouds.local import LocalCloud
from activities.clouds.local.images import (
    ImageCache,
    LocalOffer,
    find_offer,
    resolve_platform_image,
)
from activities.clouds.local.records import ResourceStore
from tests.local.vms import ImagesOnlyStorage, debian_template, new_build
from workflows.models import ResolvedSource
from workflows.template import PlatformImageSource

pytestmark = pytest.mark.local

BOOKWORM = find_offer("debian-12", "12-gen2")


class CountingBuilder:
    """A stand-in for mmdebstrap that makes a tiny root filesystem slowly, and counts how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, offer: LocalOffer, rootfs: Path, log: Path) -> None:
        self.calls += 1
        await asyncio.sleep(0.3)  # long enough for every concurrent resolve to be waiting on the lock
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc" / "os-release").write_text(f"VERSION_CODENAME={offer.suite}\n")


def platform(publisher: str, offer: str, sku: str, version: str = "latest") -> PlatformImageSource:
    return PlatformImageSource(type="PlatformImage", publisher=publisher, offer=offer, sku=sku, version=version)


async def test_a_second_resolve_uses_the_cached_base(cloud: LocalCloud, debian: ResolvedSource):
    assert BOOKWORM is not None
    kept = cloud.images.versions(BOOKWORM)
    again = await cloud.resolve_source(new_build(), debian_template())
    assert again == debian and cloud.images.versions(BOOKWORM) == kept
    assert re.fullmatch(r"0\.\d{8}\.\d+", debian.exact_version)
    assert debian.os_type == "Linux" and debian.hyper_v_generation == "V2" and debian.size_bytes > 0


async def test_an_exact_version_pins_and_gen1_skus_share_the_base(cloud: LocalCloud, debian: ResolvedSource):
    pinned = await cloud.resolve_source(new_build(), debian_template(version=debian.exact_version))
    assert pinned == debian
    gen1 = await cloud.resolve_source(new_build(), debian_template(sku="12", version=debian.exact_version))
    assert gen1.hyper_v_generation == "V1" and gen1.exact_version == debian.exact_version
    with pytest.raises(PermanentError, match=r"properties\.source\.version: .*'0\.19990101\.1'"):
        await cloud.resolve_source(new_build(), debian_template(version="0.19990101.1"))


async def test_concurrent_resolves_make_the_base_once(tmp_path: Path):
    assert BOOKWORM is not None
    builder = CountingBuilder()
    cache = ImageCache(tmp_path / "images", builder=builder)
    # Two caches on one folder stand for two worker processes: the lock is a file lock, not an asyncio one.
    other = ImageCache(tmp_path / "images", builder=builder)
    bases = await asyncio.gather(*(c.resolve(BOOKWORM, "latest") for c in (cache, other, cache, other)))
    assert builder.calls == 1
    assert len({b.version for b in bases}) == 1 and re.fullmatch(r"0\.\d{8}\.1", bases[0].version)
    assert (bases[0].rootfs / "etc" / "os-release").read_text() == "VERSION_CODENAME=bookworm\n"
    assert [p.name for p in (tmp_path / "images" / "base" / "bookworm").iterdir()] == [bases[0].version]


@pytest.mark.parametrize(
    ("publisher", "offer", "sku"),
    [
        ("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2"),
        ("RedHat", "RHEL", "9-lvm-gen2"),
        ("MicrosoftWindowsServer", "WindowsServer", "2022-datacenter-azure-edition"),
    ],
)
async def test_other_publishers_are_refused_before_anything_is_made(
    tmp_path: Path, store: ResourceStore, publisher: str, offer: str, sku: str
):
    cloud = LocalCloud(storage=ImagesOnlyStorage(), store=store, state=tmp_path)  # type: ignore[arg-type]
    template = debian_template(publisher=publisher, offer=offer, sku=sku)
    with pytest.raises(PermanentError) as refused:
        await cloud.resolve_source(new_build(), template)
    message = str(refused.value.message)
    assert message.startswith(f"properties.source: {publisher}:{offer}:{sku} is not an image the local cloud has")
    for urn in ("Debian:debian-12:12", "Debian:debian-12:12-gen2", "Debian:debian-11:11", "Debian:debian-11:11-gen2"):
        assert urn in message
    assert str(tmp_path / "local-images.json") in message
    assert ("Windows" in message) == publisher.startswith("MicrosoftWindows")
    assert not (tmp_path / "images").exists()


async def test_a_mapped_source_builds_from_the_local_image_it_names(tmp_path: Path):
    (tmp_path / "local-images.json").write_text(
        json.dumps({"Canonical:0001-com-ubuntu-server-jammy:22_04-lts": "debian-11:11"})
    )
    cache = ImageCache(tmp_path / "images", builder=CountingBuilder())
    source = platform("canonical", "0001-com-ubuntu-server-jammy", "22_04-lts", version="22.04.202301100")
    resolved = await resolve_platform_image(cache, source, state=tmp_path, location="westeurope")
    assert "/Offers/debian-11/Skus/11/Versions/" in resolved.image_id
    assert resolved.hyper_v_generation == "V1"
    assert (tmp_path / "images" / "base" / "bullseye" / resolved.exact_version / "rootfs").is_dir()


@pytest.mark.parametrize(
    ("offer", "sku", "field"),
    [("debian-13", "13", "properties.source.offer"), ("debian-12", "12-arm64", "properties.source.sku")],
)
async def test_an_unknown_debian_image_names_its_field(tmp_path: Path, offer: str, sku: str, field: str):
    cache = ImageCache(tmp_path / "images", builder=CountingBuilder())
    with pytest.raises(PermanentError, match=re.escape(field)):
        await resolve_platform_image(cache, platform("Debian", offer, sku), state=tmp_path, location="westeurope")
