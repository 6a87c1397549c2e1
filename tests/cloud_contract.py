"""The contract every ``Cloud`` keeps, as checks each cloud's test folder runs against its own cloud.

The saga leans on these rules, whatever cloud it drives: a create retried (or repeated by another worker) finds
what the first one made; a delete succeeds when the thing is already gone; what cannot work fails at once as a
``PermanentError`` of a documented kind. ``tests/workflows`` runs them on the recording cloud, ``tests/local`` on
the local cloud, ``tests/azure`` on the Azure cloud against the ARM emulator.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from activities.clouds.base import Cloud, PermanentError
from workflows.models import Artifact, BuildContext, CaptureSpec, VmSpec
from workflows.template import ImageTemplate, VhdDistributor, VmProfile

# The kinds resolve_source may refuse an unknown source with.
UNKNOWN_SOURCE_KINDS = {"SourceImageNotAvailable", "SourceImageNotFound"}


@dataclass
class CloudUnderTest:
    """A cloud, a template it can build, one whose source it must refuse, and what a build still holds on it."""

    cloud: Cloud
    template: ImageTemplate
    unknown_source: ImageTemplate
    leftovers: Callable[[BuildContext], Awaitable[list[str]]]

    def build(self) -> BuildContext:
        return BuildContext(
            build_id=f"contract-{uuid.uuid4().hex[:8]}",
            template_name="contract",
            location=self.template.location,
            cloud=self.cloud.name,
            destination_resource_group="kilnContract",
        )


async def staging_is_create_or_get_and_delete_twice(under_test: CloudUnderTest) -> None:
    cloud, build = under_test.cloud, under_test.build()
    first = await cloud.create_staging(build)
    assert await cloud.create_staging(build) == first
    staged = await cloud.stage_artifact(build, first, Artifact(source_uri="file:///s.sh", field="f"), b"echo hi\n")
    assert await cloud.read_staged(build, staged) == b"echo hi\n"
    await cloud.delete_staging(build)
    await cloud.delete_staging(build)
    assert await under_test.leftovers(build) == []


async def a_vm_and_its_capture_are_create_or_get_and_delete_twice(under_test: CloudUnderTest) -> None:
    cloud, build = under_test.cloud, under_test.build()
    source = await cloud.resolve_source(build, under_test.template)
    staging = await cloud.create_staging(build)
    spec = VmSpec(
        name=f"{build.build_id}-build", purpose="build", image_id=source.image_id, source=source, vm_profile=VmProfile()
    )
    try:
        vm = await cloud.create_vm(build, staging, spec)
        assert await cloud.create_vm(build, staging, spec) == vm
        capture = CaptureSpec(name=f"{build.build_id}-image")
        image = await cloud.capture_image(build, staging, vm, capture)
        assert await cloud.capture_image(build, staging, vm, capture) == image
    finally:
        for _ in range(2):
            await cloud.delete_image(build, f"{build.build_id}-image")
            await cloud.delete_vm(build, spec.name)
        await cloud.delete_staging(build)
    assert await under_test.leftovers(build) == []


async def deleting_an_output_never_made_succeeds(under_test: CloudUnderTest) -> None:
    cloud, build = under_test.cloud, under_test.build()
    target = VhdDistributor(type="VHD", run_output_name="never-made")
    await cloud.delete_output(build, target, 0)
    await cloud.delete_output(build, target, 0)
    assert await under_test.leftovers(build) == []


async def an_unknown_source_is_refused_before_anything_is_made(under_test: CloudUnderTest) -> None:
    cloud, build = under_test.cloud, under_test.build()
    with pytest.raises(PermanentError) as refused:
        await cloud.resolve_source(build, under_test.unknown_source)
    assert refused.value.type in UNKNOWN_SOURCE_KINDS and "properties.source" in refused.value.message
    assert await under_test.leftovers(build) == []


async def a_gallery_version_never_made_is_deleted_and_refuses_retirement(under_test: CloudUnderTest) -> None:
    version = (
        "/subscriptions/0000/resourceGroups/kilnContract/providers/Microsoft.Compute/galleries/none/images/none"
        f"/versions/0.0.{uuid.uuid4().int % 1000}"
    )
    await under_test.cloud.delete_image_version(version)
    with pytest.raises(PermanentError) as refused:
        await under_test.cloud.retire_image_version(
            version, end_of_life=datetime.now(UTC), exclude_from_latest=True, revoked="contract"
        )
    assert refused.value.type == "ImageVersionNotFound"


async def the_sweep_by_tag_deletes_what_no_undo_ran_for_and_keeps_the_log(under_test: CloudUnderTest) -> None:
    """A build that closed with its staging made and no undo run (terminated before it recorded one)."""
    cloud, build = under_test.cloud, under_test.build()
    staging = await cloud.create_staging(build)
    await cloud.stage_artifact(build, staging, Artifact(source_uri="file:///s.sh", field="f"), b"echo hi\n")
    log = await cloud.open_log(build, staging, "customization.log")
    await log.append(b"kept\n")
    assert await cloud.delete_tagged(build.build_id) != []
    assert await under_test.leftovers(build) == []
    assert await log.read() == b"kept\n"
    assert await cloud.delete_tagged(build.build_id) == []


CONTRACT = [
    staging_is_create_or_get_and_delete_twice,
    a_vm_and_its_capture_are_create_or_get_and_delete_twice,
    deleting_an_output_never_made_succeeds,
    an_unknown_source_is_refused_before_anything_is_made,
    a_gallery_version_never_made_is_deleted_and_refuses_retirement,
    the_sweep_by_tag_deletes_what_no_undo_ran_for_and_keeps_the_log,
]
CONTRACT_IDS = [check.__name__ for check in CONTRACT]
