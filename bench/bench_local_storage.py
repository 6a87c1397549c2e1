"""Local storage figures: what a VHD upload sends for a sparse 1 GiB disk, and gallery replication throughput.

    python bench/bench_local_storage.py [--used-mib 256] [--regions 3] [--replicas 1]

Starts its own Azurite (node_modules/.bin/azurite-blob) on a free port in a temp folder; prints, does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.clouds.local.admin import LocalAdmin  # noqa: E402
from activities.clouds.local.azurite import REGIONS, start_azurite  # noqa: E402
from activities.clouds.local.records import ResourceStore  # noqa: E402
from activities.clouds.local.storage import LocalStorage  # noqa: E402
from activities.clouds.local.vhd_pages import used_bytes  # noqa: E402
from tests.local.vhd_files import write_vhd  # noqa: E402
from tests.services import free_port  # noqa: E402
from workflows.models import BuildContext, CapturedImage, DistributeRequest, ResolvedSource  # noqa: E402
from workflows.template import SharedImageDistributor, TargetRegion, VhdDistributor  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB


def make_disk(path: Path, used_mib: int) -> Path:
    """A 1 GiB disk with ``used_mib`` of data in runs of 64 KiB to 8 MiB, like a fresh ext4 image."""
    rnd = random.Random(42)
    writes: dict[int, bytes] = {}
    left = used_mib * MiB
    while left > 0:
        length = min(left, rnd.choice([64 * 1024, 1 * MiB, 4 * MiB, 8 * MiB]))
        offset = rnd.randrange(0, GiB - length) // 4096 * 4096
        writes[offset] = os.urandom(length)
        left -= length
    return write_vhd(path, GiB, writes)


def request(build: BuildContext, vhd: Path, target: object) -> DistributeRequest:
    return DistributeRequest.model_validate(
        {
            "build": build,
            "staging": {"resourceGroupId": "-", "createdGroup": True, "storageUri": "-", "logUriPrefix": "-"},
            "image": CapturedImage(id="bench", uri=vhd.as_uri(), size_bytes=vhd.stat().st_size),
            "source": ResolvedSource(image_id="bench", exact_version="1.0.0"),
            "target": target,
            "index": 0,
        }
    )


async def main(used_mib: int, regions: int, replicas: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        root = Path(tmp)
        os.environ["KILN_HOME"] = str(root / "state")
        disk = await asyncio.to_thread(make_disk, root / "disk.vhd", used_mib)
        used = await used_bytes(disk)
        server = await start_azurite(location=root / "azurite", port=free_port())
        try:
            async with LocalStorage(store=ResourceStore(root / "resources.db"), endpoint=server.endpoint) as storage:
                build = BuildContext(
                    build_id=str(uuid.uuid4()), template_name="bench", location="eastus", cloud="local"
                )
                started = time.perf_counter()
                vhd = await storage.distribute(
                    request(build, disk, VhdDistributor(type="VHD", run_output_name="vhd")),
                    resume=None,
                    progress=lambda p: None,
                )
                took = time.perf_counter() - started
                sent = storage.store.get(vhd.artifact_uri).data["sentBytes"]
                print(
                    f"VHD upload: disk {disk.stat().st_size / MiB:.0f} MiB, sent {sent / MiB:.1f} MiB "
                    f"({sent / disk.stat().st_size:.1%} of the disk; used pages {used / MiB:.1f} MiB) "
                    f"in {took:.2f} s = {sent / MiB / took:.0f} MiB/s"
                )

                gallery = "/subscriptions/0/resourceGroups/bench/providers/Microsoft.Compute/galleries/bench"
                admin = LocalAdmin(storage.store)
                await admin.create_gallery(gallery)
                await admin.create_image_definition(f"{gallery}/images/disk", publisher="k", offer="b", sku="1")
                names = list(REGIONS[:regions])
                target = SharedImageDistributor(
                    type="SharedImage",
                    run_output_name="sig",
                    gallery_image_id=f"{gallery}/images/disk",
                    target_regions=[TargetRegion(name=n, replica_count=replicas) for n in names],
                )
                started = time.perf_counter()
                out = await storage.distribute(request(build, disk, target), resume=None, progress=lambda p: None)
                took = time.perf_counter() - started
                written = used * regions
                print(
                    f"replication to {regions} regions x {replicas} replicas ({', '.join(out.replication)}): "
                    f"{took:.2f} s; file read once ({used / MiB:.0f} MiB), {written / MiB:.0f} MiB written "
                    f"= {written / MiB / took:.0f} MiB/s into Azurite, {used / MiB / took:.0f} MiB/s of image"
                )
        finally:
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--used-mib", type=int, default=256)
    parser.add_argument("--regions", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(main(args.used_mib, args.regions, args.replicas))
