"""Resolve the source image: ``latest`` is pinned to an exact version, the cloud refuses what it cannot build, and
the source refuses what AIB would refuse on it (steps its OS cannot run, a disk smaller than its own), all before
anything is made; so is a data disk AIB cannot make on any source."""

from __future__ import annotations

from temporalio import activity

from activities.clouds.aib.vm_sizes import data_disk_without_size, os_disk_too_small
from activities.clouds.base import PermanentError
from activities.clouds.registry import cloud_of
from activities.common import CloudActivities, heartbeating
from workflows.golden_models import SourceCheckRequest
from workflows.models import BuildContext, ResolvedSource, ResolveSourceRequest
from workflows.template import TemplateError, check_template


class SourceActivities(CloudActivities):
    @activity.defn
    async def resolve_source(self, request: ResolveSourceRequest) -> ResolvedSource:
        disks = request.template.properties.additional_data_disks
        if problem := data_disk_without_size([disk.size_gb for disk in disks]):
            raise PermanentError(problem, kind="BadDataDisk")
        # A first local build makes the base image here, which takes a while: keep the heartbeat going.
        async with heartbeating():
            resolved = refuse_revoked(await self.cloud.resolve_source(request.build, request.template))
        if issues := self.guests.profile(resolved.os_type).template_issues(request.template):
            raise PermanentError(
                "The template cannot be built on this source:\n" + "\n".join(f"{i.path}: {i.message}" for i in issues),
                kind="InvalidTemplate",
            )
        if problem := os_disk_too_small(request.template.properties.vm_profile.os_disk_size_gb, resolved.size_bytes):
            raise PermanentError(problem, kind="OsDiskTooSmall")
        return resolved

    @activity.defn
    async def check_source(self, request: SourceCheckRequest) -> ResolvedSource:
        """Resolve a template's source as its next build would, without building: what a SourceImage trigger and a
        ``source-changed`` schedule compare with the version behind the last build."""
        try:
            checked = check_template(request.template, cloud=cloud_of(activity.info().task_queue))
        except TemplateError as err:
            raise PermanentError(str(err), kind="InvalidTemplate") from None
        template = checked.template
        build = BuildContext(
            build_id=f"{request.name}-source-check",
            template_name=request.name,
            location=template.location,
            cloud=self.cloud.name,
        )
        async with heartbeating():
            return refuse_revoked(await self.cloud.resolve_source(build, template))


def refuse_revoked(source: ResolvedSource) -> ResolvedSource:
    """A revoked version is never built from, whoever asks: a build, a trigger or a schedule.

    Raises:
        PermanentError: SourceRevoked, naming the version and why it was revoked.
    """
    if source.revoked:
        raise PermanentError(
            f"properties.source: {source.image_id} is revoked ({source.revoked}); build from another version",
            kind="SourceRevoked",
        )
    return source
