"""Lineage, revocation and retention on a real dev server, builds on the recording cloud: a revoked version is
never built from again (nor, with --descendants, what was built from it), and retention keeps exactly the newest
N plus what another template still builds from."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from temporalio.client import Client

from activities.images import read_lineage
from tests.workflows.harness import Harness
from tests.workflows.test_image_template import new_template, run_ended, state_of
from workflows.golden_models import RetentionReport, RetentionRequest, RetireRequest, RevokeRequest, RunRequest
from workflows.image_template import ImageTemplateWorkflow
from workflows.images import RetentionWorkflow, RevokeImagesWorkflow
from workflows.retention import descendants

SUB = "/subscriptions/0000/resourceGroups/images/providers/Microsoft.Compute/galleries/kiln/images"


def built_from(harness: Harness, source_version_id: str, *, definition: str) -> dict:
    """A template whose source is a gallery version, distributing to another definition."""
    template = harness.template()
    template["properties"]["source"] = {"type": "SharedImageVersion", "imageVersionId": source_version_id}
    template["properties"]["distribute"] = [
        {"type": "SharedImage", "runOutputName": "gallery", "galleryImageId": f"{SUB}/{definition}",
         "targetRegions": [{"name": "westeurope"}]}
    ]  # fmt: skip
    return template


async def build(entity, number: int):  # noqa: ANN001, ANN201
    await entity.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
    return await run_ended(entity, number)


def gallery_output(record) -> str:  # noqa: ANN001
    return next(o.artifact_id for o in record.run_outputs if o.type == "SharedImage")


async def test_revoking_a_version_and_its_descendants_stops_builds_from_them(harness: Harness, client: Client) -> None:
    base = await new_template(harness)
    older = gallery_output(await build(base, 1))
    newer = gallery_output(await build(base, 2))
    app = await new_template(harness, built_from(harness, f"{SUB}/debian/versions/latest", definition="app"))
    app_run = await build(app, 1)
    assert app_run.source_image_id == newer  # latest was the newer base
    child = gallery_output(app_run)
    lineage = await read_lineage(client, task_queue=harness.task_queue)
    assert descendants(lineage, newer) == [child]

    await client.execute_workflow(
        RevokeImagesWorkflow.run,
        RevokeRequest(
            versions=[
                RetireRequest(
                    version_id=v, action="revoked", end_of_life=datetime.now(UTC), note="CVE-2026-1", template=t
                )
                for v, t in ((newer, (await state_of(base)).name), (child, (await state_of(app)).name))
            ]
        ),
        id=f"revoke-{uuid.uuid4().hex[:6]}",
        task_queue=harness.task_queue,
    )

    versions = harness.cloud.gallery_versions()
    assert versions[newer][0] and versions[newer][2] == "CVE-2026-1"  # excluded from latest, marked revoked
    assert versions[child][0] and versions[older] == (False, "", "")
    # A template pinned to the revoked version is refused before anything is made.
    pinned = await new_template(harness, built_from(harness, newer, definition="pinned"))
    refused = await build(pinned, 1)
    assert refused.run_state == "Failed"
    assert f"{newer} is revoked (CVE-2026-1)" in refused.message
    # latest now means the older base.
    rebuilt = await build(app, 2)
    assert rebuilt.run_state == "Succeeded" and rebuilt.source_image_id == older
    shown = {o.version_id: o for t in await read_lineage(client, task_queue=harness.task_queue) for o in t.outputs}
    assert shown[newer].retired.action == "revoked" and shown[child].retired.note == "CVE-2026-1"


async def test_retention_keeps_exactly_the_newest_n_and_never_one_in_use(harness: Harness, client: Client) -> None:
    base = await new_template(harness)
    versions = [gallery_output(await build(base, n)) for n in (1, 2, 3, 4)]
    await new_template(harness, built_from(harness, versions[0], definition="pins-oldest"))
    name = (await state_of(base)).name

    async def retention(dry_run: bool) -> RetentionReport:
        return await client.execute_workflow(
            RetentionWorkflow.run,
            RetentionRequest(template=name, keep=2, dry_run=dry_run),
            id=f"retention-{uuid.uuid4().hex[:6]}",
            task_queue=harness.task_queue,
        )

    planned = await retention(dry_run=True)
    assert planned.kept == [versions[3], versions[2]]
    assert planned.in_use == [versions[0]]
    assert planned.retired == [versions[1]]
    assert set(harness.cloud.gallery_versions()) >= set(versions)  # a dry run changes nothing

    done = await retention(dry_run=False)
    assert done.retired == [versions[1]]
    assert set(harness.cloud.gallery_versions()) & set(versions) == {versions[0], versions[2], versions[3]}
    again = await retention(dry_run=False)
    assert again.retired == [] and again.kept == [versions[3], versions[2]]
    # By gallery image definition, whichever templates made its versions.
    by_definition = await client.execute_workflow(
        RetentionWorkflow.run,
        RetentionRequest(image_definition=f"{SUB}/debian", keep=1, dry_run=True),
        id=f"retention-{uuid.uuid4().hex[:6]}",
        task_queue=harness.task_queue,
    )
    assert (by_definition.kept, by_definition.in_use, by_definition.retired) == (
        [versions[3]],
        [versions[0]],
        [versions[2]],
    )
