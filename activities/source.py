"""Resolve the source image: ``latest`` is pinned to an exact version, and the cloud refuses what it cannot build."""

from __future__ import annotations

from temporalio import activity

from activities.common import CloudActivities, heartbeating
from workflows.models import ResolvedSource, ResolveSourceRequest


class SourceActivities(CloudActivities):
    @activity.defn
    async def resolve_source(self, request: ResolveSourceRequest) -> ResolvedSource:
        # A first local build makes the base image here, which takes a while: keep the heartbeat going.
        async with heartbeating():
            return await self.cloud.resolve_source(request.build, request.template)
