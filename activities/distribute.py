"""Distribution: one activity per target (ManagedImage, SharedImage, VHD), run in parallel by the workflow.

Replication can outlast any single call, so the cloud records a resume point as it goes; a retry on another
worker gets it back from the heartbeat and carries on with the same long-running operation.
"""

from __future__ import annotations

from typing import Any

from temporalio import activity

from activities.common import CloudActivities, heartbeating, undoing
from workflows.models import DeleteOutputRequest, DistributeRequest, RunOutput


class DistributeActivities(CloudActivities):
    @activity.defn
    async def distribute(self, request: DistributeRequest) -> RunOutput:
        details = activity.info().heartbeat_details
        checkpoint: dict[str, Any] = dict(details[0]) if details else {}

        def progress(point: dict[str, Any]) -> None:
            checkpoint.clear()
            checkpoint.update(point)
            activity.heartbeat(checkpoint)

        # The background beat repeats the latest resume point, so a slow step never loses it.
        async with heartbeating(checkpoint):
            return await self.cloud.distribute(request, resume=checkpoint or None, progress=progress)

    @activity.defn
    async def delete_output(self, request: DeleteOutputRequest) -> None:
        async with undoing():
            await self.cloud.delete_output(request.build, request.target, request.index)
