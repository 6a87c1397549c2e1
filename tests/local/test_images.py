"""The local marketplace: Debian bases made once and cached, versions pinned, other publishers refused or mapped."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import time
from pathlib import Path

import pytest

from activities.clouds.aib.versions import version_key
from activities.clouds.base import PermanentError
from activities.clouds.local import LocalCloud
from activities.clouds.local.images import (
    ImageCache,
    LocalOffer,
    find_offer,
    resolve_platform_image,
)
from activities.clouds.local.records import ResourceStore
from cli.builds import EXIT_USAGE
from cli.main import main
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


class DyingBuilder:
    """A stand-in for mmdebstrap run by a worker that dies half-way: a process of its own session (as mmdebstrap is)
    goes on working in the new root, with a filesystem mounted inside it, after its worker is gone."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None

    async def __call__(self, offer: LocalOffer, rootfs: Path, log: Path) -> None:
        (rootfs / "proc").mkdir(parents=True)
        self.process = await asyncio.create_subprocess_exec(
            "sh", "-c", 'mount -t tmpfs kiln-test "$1/proc" && sleep 600', "sh", str(rootfs),
            start_new_session=True,
        )  # fmt: skip
        while not os.path.ismount(rootfs / "proc"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(600)


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


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
async def test_a_base_whose_worker_died_half_way_is_made_again_from_scratch(tmp_path: Path):
    """The worker making a base dies (its step is cancelled here, which leaves the same) while its mmdebstrap still
    runs in the half-made base with a filesystem mounted there; the retry ends that process, unmounts, and makes
    the base anew."""
    assert BOOKWORM is not None
    dying = DyingBuilder()
    first = asyncio.create_task(ImageCache(tmp_path / "images", builder=dying).resolve(BOOKWORM, "latest"))
    while dying.process is None or not any("kiln-test" in line for line in Path("/proc/self/mounts").open()):
        await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    try:
        base = await ImageCache(tmp_path / "images", builder=CountingBuilder()).resolve(BOOKWORM, "latest")
        assert (base.rootfs / "etc" / "os-release").read_text() == "VERSION_CODENAME=bookworm\n"
        assert await asyncio.wait_for(dying.process.wait(), 10) == -9, "the dead worker's builder still runs"
        assert not any(str(tmp_path) in line for line in Path("/proc/self/mounts").open())
    finally:
        if dying.process.returncode is None:
            dying.process.kill()


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
    for urn in ("Debian:debian-12:12", "Debian:debian-12:12-gen2", "Debian:debian-13:13", "Debian:debian-13:13-gen2"):
        assert urn in message
    assert str(tmp_path / "local-images.json") in message
    assert ("Windows" in message) == publisher.startswith("MicrosoftWindows")
    assert not (tmp_path / "images").exists()


async def test_a_mapped_source_builds_from_the_local_image_it_names(tmp_path: Path):
    (tmp_path / "local-images.json").write_text(
        json.dumps({"Canonical:0001-com-ubuntu-server-jammy:22_04-lts": "debian-13:13"})
    )
    cache = ImageCache(tmp_path / "images", builder=CountingBuilder())
    source = platform("canonical", "0001-com-ubuntu-server-jammy", "22_04-lts", version="22.04.202301100")
    resolved = await resolve_platform_image(cache, source, state=tmp_path, location="westeurope")
    assert "/Offers/debian-13/Skus/13/Versions/" in resolved.image_id
    assert resolved.hyper_v_generation == "V1"
    assert (tmp_path / "images" / "base" / "trixie" / resolved.exact_version / "rootfs").is_dir()


@pytest.mark.parametrize(
    ("offer", "sku", "field"),
    [("debian-10", "10", "properties.source.offer"), ("debian-12", "12-arm64", "properties.source.sku")],
)
async def test_an_unknown_debian_image_names_its_field(tmp_path: Path, offer: str, sku: str, field: str):
    cache = ImageCache(tmp_path / "images", builder=CountingBuilder())
    with pytest.raises(PermanentError, match=re.escape(field)):
        await resolve_platform_image(cache, platform("Debian", offer, sku), state=tmp_path, location="westeurope")


async def test_a_base_is_a_debian_cloud_image_with_nothing_unique_to_a_machine(
    cloud: LocalCloud, debian: ResolvedSource
):
    """What Debian's Azure image holds: systemd as init, the cloud kernel and its initramfs, GRUB for BIOS and UEFI
    (the signed shim too), cloud-init looking for NoCloud then Azure, the Azure agent, sshd, sudo, curl."""
    assert BOOKWORM is not None
    root = cloud.images.base(BOOKWORM, debian.exact_version).rootfs
    assert os.readlink(root / "sbin/init").endswith("/systemd/systemd")
    kernel = (root / "vmlinuz").resolve()
    assert kernel.name.endswith("-cloud-amd64") and (root / "initrd.img").resolve().exists()
    for present in (
        "usr/lib/grub/i386-pc/boot.img",
        "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
        "usr/lib/shim/shimx64.efi.signed",
        "usr/bin/cloud-init",
        "usr/sbin/waagent",
        "usr/sbin/sshd",
        "usr/bin/sudo",
        "usr/bin/curl",
        "etc/ssl/certs/ca-certificates.crt",
    ):
        assert (root / present).exists(), present
    assert "datasource_list: [ NoCloud, Azure ]" in (root / "etc/cloud/cloud.cfg.d/90_kiln_datasource.cfg").read_text()
    assert "console=ttyS0,115200n8" in (root / "etc/default/grub.d/50-kiln-azure.cfg").read_text()
    assert not list((root / "etc/ssh").glob("ssh_host_*")) and (root / "etc/machine-id").read_text() == ""
    assert not (root / "usr/share/man").exists() or not any((root / "usr/share/man").iterdir())


async def test_a_base_older_than_its_maximum_age_or_of_an_older_recipe_is_made_again(tmp_path: Path):
    assert BOOKWORM is not None
    builder = CountingBuilder()
    cache = ImageCache(tmp_path / "images", builder=builder, max_age=datetime.timedelta(days=30))
    first = await cache.resolve(BOOKWORM, "latest")
    assert (await cache.resolve(BOOKWORM, "latest")) == first and builder.calls == 1
    # Forty days later: `latest` gets a new version; the old one can still be pinned.
    meta = first.rootfs.parent / "image.json"
    old = time.time() - 40 * 86400
    os.utime(meta, (old, old))
    second = await cache.resolve(BOOKWORM, "latest")
    assert builder.calls == 2 and version_key(second.version) > version_key(first.version)
    assert await cache.resolve(BOOKWORM, first.version) == first
    # A base of an older recipe is not used for `latest` either, and a rebuild on request makes one more.
    meta = second.rootfs.parent / "image.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "recipe": 1}))
    third = await cache.resolve(BOOKWORM, "latest")
    assert builder.calls == 3 and cache.versions(BOOKWORM) == [b.version for b in (first, second, third)]
    fourth = await cache.rebuild(BOOKWORM)
    # The newest three stay: the first goes, and can no longer be pinned.
    assert builder.calls == 4 and cache.versions(BOOKWORM) == [b.version for b in (second, third, fourth)]
    assert not first.rootfs.exists() and not list(first.rootfs.parent.parent.glob(".*"))
    with pytest.raises(PermanentError, match=f"no local version '{first.version}'"):
        await cache.resolve(BOOKWORM, first.version)


async def test_a_base_a_vm_runs_on_is_kept_past_the_newest_versions(tmp_path: Path):
    assert BOOKWORM is not None
    running_on: set[Path] = set()
    cache = ImageCache(tmp_path / "images", builder=CountingBuilder(), keep=1, in_use=running_on.__contains__)
    first = await cache.resolve(BOOKWORM, "latest")
    running_on.add(first.rootfs)
    second = await cache.rebuild(BOOKWORM)
    assert cache.versions(BOOKWORM) == [first.version, second.version]
    running_on.clear()
    third = await cache.rebuild(BOOKWORM)
    assert cache.versions(BOOKWORM) == [third.version]


async def test_kiln_bases_lists_each_release_and_what_latest_pins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    assert BOOKWORM is not None
    cache = ImageCache(tmp_path / "images", builder=CountingBuilder())
    old = await cache.resolve(BOOKWORM, "latest")
    meta = old.rootfs.parent / "image.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "recipe": 1}))
    new = await cache.resolve(BOOKWORM, "latest")
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    assert await asyncio.to_thread(main, ["bases"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "debian-12:12-gen2" in line]
    assert len(rows) == 2 and new.version in rows[0] and "latest" in rows[0]
    assert old.version in rows[1] and "older recipe" in rows[1]
    assert await asyncio.to_thread(main, ["bases", "--rebuild", "debian-9"]) == EXIT_USAGE
    assert "--rebuild: 'debian-9' is not a local offer (debian-12, debian-13)" in capsys.readouterr().err
    assert cache.versions(BOOKWORM) == [old.version, new.version]
