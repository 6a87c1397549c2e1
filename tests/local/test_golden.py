"""A template with a schedule on the local cloud, for real: a first build, a run skipped while the base is as it
was, and a rebuild once the local Debian base has a new version."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client

from activities.clouds.local.images import ImageCache, LocalOffer, find_offer
from cli.templates import create_template, schedule_of
from tests.local.builds import SOURCE, Build, LocalBuilds, shell, template
from tests.local.vms import host
from workflows.build import ImageBuildWorkflow
from workflows.golden_models import RunRecord
from workflows.image_template import ImageTemplateWorkflow

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(os.geteuid() != 0, reason="local builds need root"),
]


def private_bases(builds: LocalBuilds, folder: Path) -> ImageCache:
    """Bases of this test's own, so a new version changes `latest` for no one else: each is a hard-linked copy
    of the shared cached base (made once by mmdebstrap), so a rebuild takes moments, not minutes."""
    shared = builds.cloud.images

    async def copy_of_shared(offer: LocalOffer, rootfs: Path, log: Path) -> None:
        base = await shared.resolve(offer, "latest")
        await host("cp", "-al", str(base.rootfs), str(rootfs))

    return ImageCache(folder, builder=copy_of_shared, in_use=builds.cloud.vms.runs_on)


async def test_a_scheduled_template_rebuilds_once_the_local_base_is_rebuilt(
    local_builds: LocalBuilds,  # noqa: F811
    client: Client,
    tmp_path: Path,
) -> None:
    offer = find_offer(SOURCE["offer"], SOURCE["sku"])
    assert offer is not None
    bases = local_builds.cloud.images = private_bases(local_builds, tmp_path / "images")
    name = f"golden-{uuid.uuid4().hex[:6]}"
    entity = await create_template(
        client,
        name,
        template([shell("marker", "echo golden | sudo tee /etc/kiln-golden")]),
        cloud="local",
        task_queue=local_builds.task_queue,
    )
    schedule = await client.create_schedule(
        f"{name}-weekly",
        schedule_of(
            name=f"{name}-weekly",
            template=name,
            task_queue=local_builds.task_queue,
            cron="0 3 * * 0",
            when="source-changed",
        ),
    )

    async def scheduled_run() -> RunRecord:
        count = len((await schedule.describe()).info.recent_actions)
        await schedule.trigger()
        async with asyncio.timeout(600):
            while len((info := (await schedule.describe()).info).recent_actions) <= count:
                await asyncio.sleep(0.5)
            action = info.recent_actions[-1].action
            record = await client.get_workflow_handle(action.workflow_id, result_type=RunRecord).result()
        if record.build:  # the fixture's cleanup looks after the build's records
            status = await client.get_workflow_handle(record.build).query(ImageBuildWorkflow.status)
            local_builds.builds.append(Build(client.get_workflow_handle(record.build), status.build_id))
        return record

    try:
        first = await scheduled_run()
        assert first.run_state == "Succeeded", first.message
        assert (await scheduled_run()).message == f"skipped: source unchanged ({first.source_exact_version})"
        rebuilt = await bases.rebuild(offer)
        second = await scheduled_run()
    finally:
        await schedule.delete()

    assert second.run_state == "Succeeded", second.message
    assert first.source_exact_version != rebuilt.version == second.source_exact_version
    for build in local_builds.builds:
        assert await local_builds.leftovers(build) == []
    state = await entity.query(ImageTemplateWorkflow.describe)
    assert [r.run_state for r in state.runs] == ["Succeeded", "Skipped", "Succeeded"]
