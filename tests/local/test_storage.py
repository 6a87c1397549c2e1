"""The local cloud's storage on a real Azurite: staging, logs, VHD, managed image and gallery distribution."""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from activities.clouds.aib.names import build_guid, staging_group_name
from activities.clouds.aib.tags import ROLE_LOG, ROLE_OUTPUT, TAG_BUILD_ID, TAG_ROLE
from activities.clouds.aib.versions import next_version
from activities.clouds.base import PermanentError
from activities.clouds.local import azurite as azurite_mod
from activities.clouds.local import staging as staging_mod
from activities.clouds.local import vhd_pages as vhd_pages_mod
from activities.clouds.local.accounts import KIND_BLOB
from activities.clouds.local.admin import KIND_IMAGE_VERSION, LocalAdmin, read_log
from activities.clouds.local.azurite import Azurite, account_for_region, start_azurite
from activities.clouds.local.export import FORMATS, export_output
from activities.clouds.local.gallery_target import GalleryTarget
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.staging import KIND_CONTAINER, KIND_GROUP
from activities.clouds.local.storage import LocalStorage
from activities.clouds.local.vhd_pages import MERGE_GAP, nonzero_runs
from tests.local.vhd_files import sent_pages, used_pages, write_vhd
from tests.local.vms import host
from tests.services import free_port
from workflows.models import (
    Artifact,
    BuildContext,
    CapturedImage,
    DistributeRequest,
    ResolvedSource,
    RunOutput,
    Staging,
)
from workflows.template import (
    ManagedImageDistributor,
    SharedImageDistributor,
    TargetRegion,
    Versioning,
    VhdDistributor,
)

pytestmark = pytest.mark.local

MiB = 1024 * 1024
SUB = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/images"
GALLERY = f"{SUB}/providers/Microsoft.Compute/galleries/kilnGallery"
DEFINITION = f"{GALLERY}/images/debian12"


class WorkerLost(Exception):
    """Stands for a worker that died mid-call: the progress callback raises it."""


def new_build(**kwargs: Any) -> BuildContext:
    return BuildContext(
        build_id=str(uuid.uuid4()),
        template_name="debian12",
        location="eastus",
        cloud="local",
        destination_resource_group="images",
        **kwargs,
    )


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB sparse fixed VHD: scattered writes, a run across a 4 MiB boundary, zero pages among data."""
    rnd = random.Random(7)
    writes = {
        0: rnd.randbytes(3 * 4096),
        4 * MiB - 1024: rnd.randbytes(8192),  # crosses a read-chunk boundary
        9 * MiB: rnd.randbytes(700) + bytes(2048) + rnd.randbytes(700),  # a zero page inside a run
        20 * MiB + 100: rnd.randbytes(5 * MiB),  # starts mid-page
        63 * MiB: rnd.randbytes(MiB),
    }
    return write_vhd(tmp_path_factory.mktemp("vhd") / "disk.vhd", 64 * MiB, writes)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vhd(tmp_path_factory.mktemp("vhd") / "small.vhd", MiB, {4096: os.urandom(8192)})


async def staging_of(storage: LocalStorage, build: BuildContext) -> Staging:
    return await storage.create_staging(build)


def request_for(
    build: BuildContext,
    staging: Staging,
    vhd: Path,
    target: Any,
    *,
    index: int = 0,
    source_version: str = "1.2.3",
    data_disks: tuple[Path, ...] = (),
) -> DistributeRequest:
    return DistributeRequest(
        build=build,
        staging=staging,
        image=CapturedImage(
            id=f"captured-{build.build_id}",
            uri=vhd.as_uri(),
            size_bytes=vhd.stat().st_size,
            data_disk_snapshots=[d.as_uri() for d in data_disks],
        ),
        source=ResolvedSource(image_id="debian:debian-12:12:latest", exact_version=source_version),
        target=target,
        index=index,
    )


async def distribute(storage: LocalStorage, request: DistributeRequest, resume: dict | None = None) -> RunOutput:
    return await storage.distribute(request, resume=resume, progress=lambda point: None)


async def blob_bytes(storage: LocalStorage, url: str) -> bytes:
    return await (await storage.accounts.blob_at(url).download_blob()).readall()


async def make_definition(storage: LocalStorage, definition: str = DEFINITION) -> None:
    admin = LocalAdmin(storage.store)
    await admin.create_gallery(definition.rsplit("/images/", 1)[0], location="eastus")
    await admin.create_image_definition(definition, publisher="kiln", offer="debian", sku="12")


def shared(definition: str = DEFINITION, **kwargs: Any) -> SharedImageDistributor:
    kwargs.setdefault("target_regions", [TargetRegion(name="eastus")])
    return SharedImageDistributor(type="SharedImage", run_output_name="sig", gallery_image_id=definition, **kwargs)


# ---- pure parts


def test_nonzero_runs_match_a_page_by_page_scan() -> None:
    rnd = random.Random(1)
    for _ in range(200):
        pages = [
            rnd.choice([bytes(512), rnd.randbytes(512), bytes(511) + b"\x01", bytes(300) + b"\x02" + bytes(211)])
            for _ in range(rnd.randint(0, 300))
        ]
        buf = b"".join(pages)
        expected, start = [], None
        for i, page in enumerate([*pages, bytes(512)]):
            if page != bytes(512) and start is None:
                start = i * 512
            elif page == bytes(512) and start is not None:
                expected.append((start, i * 512))
                start = None
        assert list(nonzero_runs(buf)) == expected


def test_next_version_follows_the_aib_example() -> None:
    gallery = ["0.1.1", "0.1.2", "1.1.0", "1.2.0", "2.0.0", "2.1.0"]
    assert next_version(gallery) == "2.1.1"
    assert next_version(gallery, 2) == "2.1.1"
    assert next_version(gallery, 1) == "1.2.1"
    assert next_version(gallery, 0) == "0.1.3"
    assert next_version([]) == "1.0.0"
    assert next_version(gallery, 5) == "5.0.0"
    assert next_version(["1.9.0", "1.10.0"]) == "1.10.1"  # numeric, not text, order


def test_staging_names_fit_azure_limits() -> None:
    build = new_build().model_copy(update={"template_name": "t" * 200, "destination_resource_group": "rg" * 50})
    name = staging_group_name(build)
    assert len(name) == 90 and name.startswith("IT_rgrg") and name.endswith(f"_{build_guid(build.build_id)}")
    odd = staging_mod._container_name("staging", "Build_ID/with spaces--and" + "x" * 80)
    assert len(odd) <= 63 and odd.startswith("staging-build-id-with-spaces-and") and "--" not in odd


def test_unknown_region_names_the_field_and_the_local_regions() -> None:
    assert account_for_region("East US 2") == "kilneastus2"
    with pytest.raises(PermanentError) as err:
        account_for_region("mars", field="properties.distribute[0].location")
    assert "properties.distribute[0].location" in str(err.value) and "westeurope" in str(err.value)


# ---- Azurite


def recording_sends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, int]]:
    """Every upload of a disk file from now on: the file, and the bytes of it that were sent."""
    sent: list[tuple[Path, int]] = []
    send = vhd_pages_mod.send_used_pages

    async def recording(path: Path, *args: Any, **kwargs: Any) -> int:
        sent.append((path, await send(path, *args, **kwargs)))
        return sent[-1][1]

    monkeypatch.setattr(vhd_pages_mod, "send_used_pages", recording)
    return sent


async def test_start_azurite_reuses_a_running_one(azurite: Azurite) -> None:
    port = int(azurite.endpoint.rsplit(":", 1)[1])
    again = await start_azurite(location=azurite.location, port=port)
    assert not again.owned and again.endpoint == azurite.endpoint and again.pid == azurite.pid
    await again.stop()
    assert await azurite_mod.answers(azurite.endpoint)  # a reused one is left running


async def test_azurite_keeps_its_data_across_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("KILN_AZURITE_ENDPOINT", f"http://127.0.0.1:{port}")
    first = await start_azurite(location=tmp_path)  # host and port from KILN_AZURITE_ENDPOINT
    assert first.owned and first.endpoint == azurite_mod.endpoint()
    async with LocalStorage(store=ResourceStore(tmp_path / "resources.db")) as storage:
        await storage.accounts.ensure_container("kilnuksouth", "keep")
        await storage.accounts.blob("kilnuksouth", "keep", "a").upload_blob(b"kept")
    await first.stop()
    assert not await azurite_mod.answers(first.endpoint) and not (tmp_path / azurite_mod.PID_FILE).exists()
    second = await start_azurite(location=tmp_path)
    try:
        async with LocalStorage(store=ResourceStore(tmp_path / "resources.db")) as storage:
            assert await (await storage.accounts.blob("kilnuksouth", "keep", "a").download_blob()).readall() == b"kept"
    finally:
        await second.stop()


async def test_a_port_taken_by_something_else_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="did not start"):
            await start_azurite(location=tmp_path, port=taken.getsockname()[1])


# ---- staging and logs


async def test_staging_create_and_delete_are_idempotent(local_storage: LocalStorage) -> None:
    build = new_build()
    await local_storage.delete_staging(build)  # before create: nothing to do
    first = await local_storage.create_staging(build)
    again = await local_storage.create_staging(build)
    assert first == again and first.created_group
    assert "/resourceGroups/IT_images_debian12_" in first.resource_group_id
    kinds = {r.kind for r in local_storage.store.list(build_id=build.build_id)}
    assert kinds == {KIND_GROUP, KIND_CONTAINER}

    artifact = Artifact(source_uri="https://example.invalid/setup.sh", field="properties.customize[0].scriptUri")
    staged = await local_storage.stage_artifact(build, first, artifact, b"echo hello\n")
    assert staged.sha256 == hashlib.sha256(b"echo hello\n").hexdigest() and staged.staged_uri.startswith(
        first.storage_uri
    )
    assert await local_storage.read_staged(build, staged) == b"echo hello\n"

    await local_storage.delete_staging(build)
    await local_storage.delete_staging(build)
    assert local_storage.store.list(build_id=build.build_id) == []
    with pytest.raises(Exception, match="BlobNotFound|ContainerNotFound"):
        await local_storage.read_staged(build, staged)


async def test_an_existing_staging_group_is_used_but_never_deleted(local_storage: LocalStorage) -> None:
    group = f"/subscriptions/{staging_mod.LOCAL_SUBSCRIPTION}/resourceGroups/my-staging"
    local_storage.store.record(group.lower(), kind=KIND_GROUP, build_id=None, data={"id": group})
    build = new_build(staging_resource_group=group)
    staging = await local_storage.create_staging(build)
    assert staging.resource_group_id == group and not staging.created_group
    await local_storage.delete_staging(build)
    assert local_storage.store.get(group.lower()) is not None
    assert local_storage.store.list(build_id=build.build_id) == []


async def test_records_with_the_old_build_id_tag_are_found_and_cleaned_up(local_storage: LocalStorage) -> None:
    """Records written when the build-id tag was ``buildId``: found by their build id column all the same."""
    build = new_build()
    staging = await local_storage.create_staging(build)
    await local_storage.stage_artifact(build, staging, Artifact(source_uri="file:///a", field="f"), b"data")
    for record in local_storage.store.list(build_id=build.build_id):
        old_tags = {"buildId": build.build_id, "createdBy": "kiln", TAG_ROLE: "temporary"}
        local_storage.store.record(
            record.id, kind=record.kind, build_id=build.build_id, tags=old_tags, data=record.data
        )
    orphans = await LocalAdmin(local_storage.store).list_resources(orphans_only=True)
    assert {r.kind for r in orphans if r.build_id == build.build_id} == {KIND_GROUP, KIND_CONTAINER, KIND_BLOB}
    await local_storage.delete_staging(build)
    assert local_storage.store.list(build_id=build.build_id) == []


async def test_logs_survive_delete_staging(local_storage: LocalStorage) -> None:
    build = new_build()
    staging = await local_storage.create_staging(build)
    log = await local_storage.open_log(build, staging, "customization.log")
    assert log.uri == f"{staging.log_uri_prefix}customization.log" and "?" not in log.uri
    await log.append(b"line 1\n")
    await log.append(b"line 2\n")
    assert await read_log(log.uri) == b"line 1\nline 2\n"
    assert await read_log(log.uri, 7) == b"line 2\n"
    assert await read_log(log.uri, 14) == b""
    assert await read_log(f"{staging.log_uri_prefix}validation.log") == b""

    await local_storage.delete_staging(build)
    taken_over = await local_storage.open_log(build, staging, "customization.log")  # another worker carries on
    await taken_over.append(b"line 3\n")
    assert await read_log(log.uri) == b"line 1\nline 2\nline 3\n"
    await log.append(b"line 4\n")  # the first writer, behind the log's end, follows it instead of failing
    assert await read_log(log.uri) == b"line 1\nline 2\nline 3\nline 4\n"
    [record] = local_storage.store.list(build_id=build.build_id)
    assert record.id == log.uri and record.tags[TAG_ROLE] == ROLE_LOG


# ---- VHD


async def test_vhd_upload_sends_only_used_pages(local_storage: LocalStorage, disk: Path) -> None:
    build = new_build()
    staging = await local_storage.create_staging(build)
    target = VhdDistributor(type="VHD", run_output_name="vhd", artifact_tags={"team": "images"})
    points: list[dict] = []
    output = await local_storage.distribute(
        request_for(build, staging, disk, target), resume=None, progress=points.append
    )

    assert output.type == "VHD" and output.artifact_uri.endswith(f"/{build.build_id}/vhd.vhd")
    assert "?" not in output.artifact_uri and output.artifact_uri.startswith(local_storage.endpoint)
    blob = local_storage.accounts.blob_at(output.artifact_uri)
    ranges = [r async for r in blob.list_page_ranges()]
    sent = sent_pages(disk, MERGE_GAP)
    assert sum(r.end + 1 - r.start for r in ranges) == sent < disk.stat().st_size // 10
    assert sent - used_pages(disk) < used_pages(disk) // 10  # short zero gaps ride along, nothing more
    assert await blob_bytes(local_storage, output.artifact_uri) == disk.read_bytes()
    assert points and points[-1]["offset"] == disk.stat().st_size
    record = local_storage.store.get(output.artifact_uri)
    assert record.data["sentBytes"] == sent
    assert record.tags == {"team": "images", TAG_BUILD_ID: build.build_id, "createdBy": "kiln", TAG_ROLE: ROLE_OUTPUT}

    await local_storage.delete_staging(build)  # the VHD is an output: it stays
    assert await blob.exists()


async def test_vhd_to_a_given_uri(local_storage: LocalStorage, small_disk: Path) -> None:
    build = new_build()
    staging = await local_storage.create_staging(build)
    uri = f"{local_storage.endpoint}/kilnwesteurope/exports/{build.build_id}.vhd"
    output = await distribute(
        local_storage, request_for(build, staging, small_disk, VhdDistributor(type="VHD", run_output_name="v", uri=uri))
    )
    assert output.artifact_uri == uri and await blob_bytes(local_storage, uri) == small_disk.read_bytes()
    other = new_build()
    with pytest.raises(PermanentError, match=r"distribute\[0\]\.uri: a blob already exists"):
        await distribute(
            local_storage,
            request_for(other, staging, small_disk, VhdDistributor(type="VHD", run_output_name="v", uri=uri)),
        )
    with pytest.raises(PermanentError, match=r"distribute\[0\]\.uri"):
        await distribute(
            local_storage,
            request_for(
                other,
                staging,
                small_disk,
                VhdDistributor(type="VHD", run_output_name="v", uri="https://x.example/a/b.vhd"),
            ),
        )


async def test_export_writes_each_format_with_the_same_disk_inside(
    local_storage: LocalStorage, disk: Path, tmp_path: Path
) -> None:
    """A VHD output comes from its page blob, an image output from the image cache; each format holds the disk."""
    exports = tmp_path / "exports"
    exports.mkdir()
    build = new_build()
    staging = await local_storage.create_staging(build)
    target = ManagedImageDistributor(
        type="ManagedImage", run_output_name="mi", image_id=f"{SUB}/providers/Microsoft.Compute/images/exported",
        location="eastus",
    )  # fmt: skip
    outputs = [
        await distribute(
            local_storage, request_for(build, staging, disk, VhdDistributor(type="VHD", run_output_name="v"))
        ),
        await distribute(local_storage, request_for(build, staging, disk, target, index=1)),
    ]
    for output in outputs:
        for disk_format in FORMATS:
            path = exports / f"{output.run_output_name}.{disk_format}"
            seen: list[float] = []
            await export_output(local_storage, output, path, disk_format, on_progress=seen.append)
            assert seen and seen[-1] == 100.0
            await host("qemu-img", "compare", "-q", "-f", "vpc", "-F", disk_format, str(disk), str(path))
            path.unlink()
    assert list(exports.iterdir()) == []  # no partial file and no fetched VHD left beside the exports
    gone = outputs[0].model_copy(update={"artifact_uri": outputs[0].artifact_uri + ".gone"})
    with pytest.raises(PermanentError, match=r"the VHD .*\.gone is gone"):
        await export_output(local_storage, gone, exports / "x.raw", "raw")
    assert list(exports.iterdir()) == []


# ---- managed image


async def test_managed_image_is_registered_and_located(
    local_storage: LocalStorage, small_disk: Path, disk: Path
) -> None:
    image_id = f"{SUB}/providers/Microsoft.Compute/images/debian12-golden"
    build = new_build()
    staging = await local_storage.create_staging(build)
    target = ManagedImageDistributor(type="ManagedImage", run_output_name="mi", image_id=image_id, location="East US")
    output = await distribute(local_storage, request_for(build, staging, small_disk, target))
    assert output.artifact_id == image_id
    found = await local_storage.locate_image(image_id.upper())  # ARM ids are case-insensitive
    assert found.vhd_path.read_bytes() == small_disk.read_bytes() and found.hyper_v_generation == "V2"
    assert (await local_storage.locate_image(image_id)).vhd_path == found.vhd_path  # downloaded once

    # Built again at the same id, the image is replaced and the old blob goes.
    old_blob = local_storage.store.get(image_id.lower()).data["blobUrl"]
    rebuild = new_build()
    await distribute(local_storage, request_for(rebuild, staging, disk, target))
    assert (await local_storage.locate_image(image_id)).vhd_path.read_bytes() == disk.read_bytes()
    assert not await local_storage.accounts.blob_at(old_blob).exists() and local_storage.store.get(old_blob) is None

    moved = target.model_copy(update={"location": "westeurope"})
    with pytest.raises(PermanentError, match=r"distribute\[0\]\.location: the image .* exists in eastus"):
        await distribute(local_storage, request_for(new_build(), staging, small_disk, moved))
    with pytest.raises(PermanentError, match=r"distribute\[0\]\.location: 'mars' is not a region.*swedencentral"):
        await distribute(
            local_storage, request_for(new_build(), staging, small_disk, target.model_copy(update={"location": "mars"}))
        )
    with pytest.raises(
        PermanentError, match=r"properties\.source\.imageId: there is no local managed image .*debian12-golden"
    ):
        await local_storage.locate_image(f"{SUB}/providers/Microsoft.Compute/images/nope")


# ---- gallery


async def test_gallery_and_definition_must_exist(local_storage: LocalStorage, small_disk: Path) -> None:
    build = new_build()
    staging = await local_storage.create_staging(build)
    request = request_for(build, staging, small_disk, shared(), index=2)
    with pytest.raises(
        PermanentError, match=r"distribute\[2\]\.galleryImageId: the gallery .* does not exist.*kiln gallery create"
    ):
        await distribute(local_storage, request)
    admin = LocalAdmin(local_storage.store)
    await admin.create_gallery(GALLERY)
    with pytest.raises(PermanentError, match=r"image definition .*debian12 does not exist.*kiln gallery create"):
        await distribute(local_storage, request)
    await admin.create_image_definition(DEFINITION, hyper_v_generation="V1", publisher="kiln", offer="d", sku="12")
    with pytest.raises(PermanentError, match="generation V2, but the image definition .* is V1"):
        await distribute(local_storage, request)
    assert local_storage.store.list(build_id=build.build_id, kind=KIND_IMAGE_VERSION) == []


async def test_versions_are_numbered_by_the_versioning_scheme(local_storage: LocalStorage, small_disk: Path) -> None:
    await make_definition(local_storage)
    build = new_build()
    staging = await local_storage.create_staging(build)

    async def version(target: SharedImageDistributor, source_version: str = "1.2.3") -> str:
        output = await distribute(
            local_storage, request_for(new_build(), staging, small_disk, target, source_version=source_version)
        )
        return output.artifact_id.rsplit("/versions/", 1)[1]

    assert await version(shared()) == "1.0.0"
    for v in ["0.1.1", "0.1.2", "1.1.0", "1.2.0", "2.0.0", "2.1.0"]:
        assert await version(shared(f"{DEFINITION}/versions/{v}")) == v
    assert await version(shared(versioning=Versioning(scheme="Latest", major=1))) == "1.2.1"
    assert await version(shared(versioning=Versioning(scheme="Latest", major=0))) == "0.1.3"
    assert await version(shared(versioning=Versioning(scheme="Latest"))) == "2.1.1"
    assert await version(shared()) == "2.1.2"
    assert await version(shared(versioning=Versioning(scheme="Source")), "12.20240101.3") == "12.20240101.3"
    with pytest.raises(PermanentError, match=r"versioning\.scheme: version 12\.20240101\.3 of .* already exists"):
        await version(shared(versioning=Versioning(scheme="Source")), "12.20240101.3")
    with pytest.raises(PermanentError, match=r"versioning\.scheme: '20240101' is not a gallery image version"):
        await version(shared(versioning=Versioning(scheme="Source")), "20240101")
    with pytest.raises(PermanentError, match=r"galleryImageId: version 1\.1\.0 of .* already exists"):
        await version(shared(f"{DEFINITION}/versions/1.1.0"))

    # A retried target gets the version its first try claimed, not the next number.
    retried = new_build()
    request = request_for(retried, staging, small_disk, shared())
    first = await distribute(local_storage, request)
    assert (await distribute(local_storage, request)).artifact_id == first.artifact_id


async def test_replication_to_three_regions_with_two_replicas(local_storage: LocalStorage, disk: Path) -> None:
    await make_definition(local_storage)
    build = new_build()
    staging = await local_storage.create_staging(build)
    regions = [TargetRegion(name=n, replica_count=2) for n in ("eastus", "West US 2", "northeurope")]
    output = await distribute(local_storage, request_for(build, staging, disk, shared(target_regions=regions)))
    assert output.replication == {"eastus": "Completed", "West US 2": "Completed", "northeurope": "Completed"}
    [version] = local_storage.store.list(build_id=build.build_id, kind=KIND_IMAGE_VERSION)
    assert version.id == output.artifact_id.lower() and version.data["state"] == "Succeeded"
    expected = hashlib.sha256(disk.read_bytes()).hexdigest()
    blobs = [url for region in version.data["regions"].values() for url in region["blobs"]]
    assert len(blobs) == 6 and len({url.split("/")[3] for url in blobs}) == 3  # one account per region
    for url in blobs:
        assert hashlib.sha256(await blob_bytes(local_storage, url)).hexdigest() == expected
        assert local_storage.store.get(url).tags[TAG_ROLE] == ROLE_OUTPUT


async def test_a_target_without_regions_replicates_to_its_definitions_region(
    local_storage: LocalStorage, small_disk: Path
) -> None:
    """Neither targetRegions nor replicationRegions (allowed from 2022-07-01): the image definition's region."""
    await make_definition(local_storage)  # its gallery is in eastus
    build = new_build()
    staging = await local_storage.create_staging(build)
    output = await distribute(local_storage, request_for(build, staging, small_disk, shared(target_regions=None)))
    assert output.replication == {"eastus": "Completed"}


async def test_a_shallow_version_is_one_replica_in_the_build_s_region(
    local_storage: LocalStorage, small_disk: Path
) -> None:
    await make_definition(local_storage)
    build = new_build()
    staging = await local_storage.create_staging(build)
    target = shared(replication_mode="Shallow", target_regions=[TargetRegion(name=build.location)])
    output = await distribute(local_storage, request_for(build, staging, small_disk, target))
    assert output.replication == {build.location: "Completed"}
    [version] = local_storage.store.list(build_id=build.build_id, kind=KIND_IMAGE_VERSION)
    assert version.data["replicationMode"] == "Shallow"
    [region] = version.data["regions"].values()
    assert len(region["blobs"]) == 1
    assert await blob_bytes(local_storage, region["blobs"][0]) == small_disk.read_bytes()


async def test_a_resumed_replication_skips_completed_regions(
    local_storage: LocalStorage,
    disk: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_definition(local_storage)
    build = new_build()
    staging = await local_storage.create_staging(build)
    regions = [TargetRegion(name=n, replica_count=2) for n in ("eastus", "westus2", "northeurope")]
    request = request_for(build, staging, disk, shared(target_regions=regions))

    sent = recording_sends(monkeypatch)
    finish = GalleryTarget._finish_region

    async def failing_finish(self: GalleryTarget, entry: dict) -> None:
        if entry["name"] == "westus2":
            raise ConnectionError("worker lost")
        await finish(self, entry)

    monkeypatch.setattr(GalleryTarget, "_finish_region", failing_finish)
    points: list[dict] = []
    with pytest.raises(ConnectionError):
        await local_storage.distribute(request, resume=None, progress=lambda p: points.append(dict(p)))
    assert points[-1]["completed"] == ["eastus", "northeurope"]
    [version] = local_storage.store.list(build_id=build.build_id, kind=KIND_IMAGE_VERSION)
    done = {
        url: (await local_storage.accounts.blob_at(url).get_blob_properties()).etag
        for k in ("eastus", "northeurope")
        for url in version.data["regions"][k]["blobs"]
    }

    monkeypatch.setattr(GalleryTarget, "_finish_region", finish)
    output = await local_storage.distribute(request, resume=points[-1], progress=lambda p: None)
    assert set(output.replication.values()) == {"Completed"}
    assert [pages for _, pages in sent] == [
        sent_pages(disk, MERGE_GAP),
        0,
    ]  # the file was streamed once; the retry only finished westus2's replicas
    for url, etag in done.items():
        assert (await local_storage.accounts.blob_at(url).get_blob_properties()).etag == etag
    westus2 = version.data["regions"]["westus2"]["blobs"]
    assert await blob_bytes(local_storage, westus2[1]) == disk.read_bytes()


async def test_an_interrupted_upload_carries_on_from_its_checkpoint(
    local_storage: LocalStorage,
    disk: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_definition(local_storage)
    monkeypatch.setattr(vhd_pages_mod, "_BATCH_BYTES", MiB)
    build = new_build()
    staging = await local_storage.create_staging(build)
    request = request_for(
        build, staging, disk, shared(target_regions=[TargetRegion(name="eastus"), TargetRegion(name="uksouth")])
    )
    points: list[dict] = []

    def progress(point: dict) -> None:
        points.append(dict(point))
        if len(points) == 2:
            raise WorkerLost

    with pytest.raises(WorkerLost):
        await local_storage.distribute(request, resume=None, progress=progress)
    checkpoint = points[-1]
    assert 0 < checkpoint["offset"] < disk.stat().st_size and checkpoint["completed"] == []
    later: list[dict] = []
    output = await local_storage.distribute(request, resume=checkpoint, progress=later.append)
    assert later[0]["offset"] > checkpoint["offset"] and later[0]["version"] == checkpoint["version"]
    for region in local_storage.store.get(output.artifact_id.lower()).data["regions"].values():
        assert await blob_bytes(local_storage, region["blobs"][0]) == disk.read_bytes()


async def test_exclude_from_latest(local_storage: LocalStorage, disk: Path, small_disk: Path) -> None:
    await make_definition(local_storage)
    staging = await local_storage.create_staging(new_build())
    await distribute(local_storage, request_for(new_build(), staging, disk, shared(f"{DEFINITION}/versions/1.0.0")))
    await distribute(
        local_storage,
        request_for(new_build(), staging, small_disk, shared(f"{DEFINITION}/versions/1.0.1", exclude_from_latest=True)),
    )

    latest = await local_storage.locate_image(f"{DEFINITION}/versions/latest")
    assert latest.exact_version == "1.0.0" and latest.vhd_path.read_bytes() == disk.read_bytes()
    assert latest.vhd_path.stat().st_blocks * 512 < 16 * MiB  # downloaded sparse: only the used pages
    pinned = await local_storage.locate_image(f"{DEFINITION}/versions/1.0.1")
    assert pinned.exact_version == "1.0.1" and pinned.vhd_path.read_bytes() == small_disk.read_bytes()
    with pytest.raises(
        PermanentError, match=r"properties\.source\.imageVersionId: no version '9\.9\.9' .*versions: 1\.0\.0, 1\.0\.1"
    ):
        await local_storage.locate_image(f"{DEFINITION}/versions/9.9.9")


async def test_a_revoked_version_leaves_latest_and_a_deleted_one_leaves_its_replicas(
    local_storage: LocalStorage, small_disk: Path
) -> None:
    await make_definition(local_storage)
    staging = await local_storage.create_staging(new_build())
    for version in ("1.0.0", "1.0.1"):
        await distribute(
            local_storage, request_for(new_build(), staging, small_disk, shared(f"{DEFINITION}/versions/{version}"))
        )
    newest = f"{DEFINITION}/versions/1.0.1"
    end = datetime.datetime(2026, 12, 31, tzinfo=datetime.UTC)

    await local_storage.gallery.retire(newest, end_of_life=end.isoformat(), exclude_from_latest=True, revoked="CVE-1")

    assert (await local_storage.locate_image(f"{DEFINITION}/versions/latest")).exact_version == "1.0.0"
    assert (await local_storage.locate_image(newest)).revoked == "CVE-1"
    record = local_storage.store.get(newest.lower())
    assert record.data["endOfLifeDate"] == end.isoformat() and record.data["state"] == "Succeeded"

    blobs = [url for entry in record.data["regions"].values() for url in entry["blobs"]]
    await local_storage.gallery.delete_version(newest)
    await local_storage.gallery.delete_version(newest)  # already gone: fine
    assert local_storage.store.get(newest.lower()) is None
    assert not any([await local_storage.accounts.blob_at(url).exists() for url in blobs])


async def test_an_image_s_data_disks_go_with_it_to_images_and_versions_and_go_with_them(
    local_storage: LocalStorage, small_disk: Path, disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A managed image and a gallery version hold the data disks at their LUNs (each replica of a version too), and
    give them back as a source; a VHD target is the OS disk alone. A version's upload resumes disk by disk, and its
    data disks' blobs go when it is deleted, as a managed image's go when it is made again."""
    await make_definition(local_storage)
    data_disks = tuple(
        write_vhd(tmp_path / f"lun{lun}.vhd", (lun + 1) * MiB, {lun * 4096: os.urandom(4096)}) for lun in range(2)
    )
    build = new_build()
    staging = await local_storage.create_staging(build)
    image_id = f"{SUB}/providers/Microsoft.Compute/images/with-disks"
    targets = [
        VhdDistributor(type="VHD", run_output_name="vhd"),
        ManagedImageDistributor(type="ManagedImage", run_output_name="mi", image_id=image_id, location="uksouth"),
        shared(target_regions=[TargetRegion(name="eastus", replica_count=2), TargetRegion(name="westus3")]),
    ]

    def request(index: int) -> DistributeRequest:
        return request_for(build, staging, small_disk, targets[index], index=index, data_disks=data_disks)

    assert (await distribute(local_storage, request(0))).artifact_uri.endswith("/vhd.vhd")
    await distribute(local_storage, request(1))
    managed = local_storage.store.get(image_id.lower())
    assert [(d["lun"], d["sizeBytes"]) for d in managed.data["dataDiskImages"]] == [(0, MiB), (1, 2 * MiB)]

    points: list[dict] = []

    def lost_in_lun_1(point: dict) -> None:
        points.append(dict(point))
        if point["disk"] == 2:
            raise WorkerLost

    with pytest.raises(WorkerLost):
        await local_storage.distribute(request(2), resume=None, progress=lost_in_lun_1)
    sent = recording_sends(monkeypatch)
    output = await local_storage.distribute(request(2), resume=points[-1], progress=lambda point: None)
    assert [path for path, _ in sent] == [data_disks[1]]  # the OS disk and LUN 0 were whole already
    version = local_storage.store.get(output.artifact_id.lower())
    assert [(d["lun"], d["sizeBytes"]) for d in version.data["dataDiskImages"]] == [(0, MiB), (1, 2 * MiB)]
    regions = version.data["regions"].values()
    assert [[len(replicas) for replicas in r["dataDiskBlobs"]] for r in regions] == [[2, 2], [1, 1]]
    for region in regions:
        for lun, replicas in enumerate(region["dataDiskBlobs"]):
            for url in replicas:
                assert await blob_bytes(local_storage, url) == data_disks[lun].read_bytes()

    for located in (await local_storage.locate_image(image_id), await local_storage.locate_image(output.artifact_id)):
        assert [d.read_bytes() for d in located.data_disks] == [d.read_bytes() for d in data_disks]
    # Only the VHD's own blob is the VHD target's.
    vhd_blobs = [r.id for r in local_storage.store.list(build_id=build.build_id, kind=KIND_BLOB) if "/vhds/" in r.id]
    assert len(vhd_blobs) == 1

    image_blobs = [d["blobUrl"] for d in managed.data["dataDiskImages"]]
    await distribute(local_storage, request_for(new_build(), staging, disk, targets[1], index=1))
    assert local_storage.store.get(image_id.lower()).data["dataDiskImages"] == []
    version_blobs = [url for r in regions for replicas in r["dataDiskBlobs"] for url in replicas]
    await local_storage.gallery.delete_version(output.artifact_id)
    for url in image_blobs + version_blobs:
        assert not await local_storage.accounts.blob_at(url).exists() and local_storage.store.get(url) is None


async def test_delete_output_removes_an_unfinished_distribution(
    local_storage: LocalStorage,
    disk: Path,
    small_disk: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_definition(local_storage)
    monkeypatch.setattr(vhd_pages_mod, "_BATCH_BYTES", MiB)
    build = new_build()
    staging = await local_storage.create_staging(build)
    targets = [
        shared(target_regions=[TargetRegion(name="eastus", replica_count=2), TargetRegion(name="westus3")]),
        VhdDistributor(type="VHD", run_output_name="vhd"),
    ]

    def stop_at_second_batch() -> Callable[[dict], None]:
        seen: list[dict] = []

        def progress(point: dict) -> None:
            seen.append(point)
            if len(seen) == 2:
                raise WorkerLost

        return progress

    for index, target in enumerate(targets):
        with pytest.raises(WorkerLost):
            await local_storage.distribute(
                request_for(build, staging, disk, target, index=index), resume=None, progress=stop_at_second_batch()
            )
    left = [r for r in local_storage.store.list(build_id=build.build_id) if r.kind not in (KIND_GROUP, KIND_CONTAINER)]
    assert {r.kind for r in left} == {KIND_BLOB, KIND_IMAGE_VERSION} and len(left) == 5
    for index, target in enumerate(targets):
        await local_storage.delete_output(build, target, index)
        await local_storage.delete_output(build, target, index)  # already gone: fine
    for record in left:
        assert local_storage.store.get(record.id) is None
        if record.kind == KIND_BLOB:
            assert not await local_storage.accounts.blob_at(record.id).exists()

    # A finished output is not "unfinished": delete_output leaves it.
    done = await distribute(local_storage, request_for(build, staging, small_disk, targets[1], index=1))
    await local_storage.delete_output(build, targets[1], 1)
    assert await local_storage.accounts.blob_at(done.artifact_uri).exists()


async def test_every_blob_is_recorded_and_temporary_ones_forgotten(
    local_storage: LocalStorage, small_disk: Path
) -> None:
    await make_definition(local_storage)
    build = new_build()
    staging = await local_storage.create_staging(build)
    await local_storage.stage_artifact(build, staging, Artifact(source_uri="file:///a", field="f"), b"data")
    await (await local_storage.open_log(build, staging, "customization.log")).append(b"x")
    targets = [
        VhdDistributor(type="VHD", run_output_name="vhd"),
        ManagedImageDistributor(
            type="ManagedImage",
            run_output_name="mi",
            image_id=f"{SUB}/providers/Microsoft.Compute/images/rec",
            location="uksouth",
        ),
        shared(target_regions=[TargetRegion(name="eastus", replica_count=2)]),
    ]
    for index, target in enumerate(targets):
        await distribute(local_storage, request_for(build, staging, small_disk, target, index=index))

    async def blobs_of_build() -> set[str]:
        found = set()
        for account in azurite_mod.local_accounts():
            service = local_storage.accounts.service(account)
            async for container in service.list_containers():
                async for blob in service.get_container_client(container.name).list_blobs(include=["metadata"]):
                    if (blob.metadata or {}).get("kilnbuildid") == build.build_id:
                        found.add(service.get_blob_client(container.name, blob.name).url)
        return found

    recorded = {r.id for r in local_storage.store.list(build_id=build.build_id, kind=KIND_BLOB)}
    assert await blobs_of_build() == recorded and len(recorded) == 6  # artifact, log, vhd, image, 2 replicas
    admin = LocalAdmin(local_storage.store)
    orphans = await admin.list_resources(orphans_only=True)
    assert {r.kind for r in orphans if r.build_id == build.build_id} == {KIND_GROUP, KIND_CONTAINER, KIND_BLOB}
    assert await admin.list_resources(orphans_only=True, active_builds={build.build_id}) == []

    await local_storage.delete_staging(build)
    left = local_storage.store.list(build_id=build.build_id)
    assert all(r.tags[TAG_ROLE] in (ROLE_OUTPUT, ROLE_LOG) for r in left) and len(left) == 7
    assert {r.id for r in left if r.kind == KIND_BLOB} == await blobs_of_build()
    listed = await admin.list_gallery(GALLERY)
    assert [r.kind for r in listed] == ["gallery", "galleryImageDefinition", "galleryImageVersion"]
