"""Capture the generalized build VM as an image, the one every distribution target is made from."""

from __future__ import annotations

from temporalio import activity

from activities.common import CloudActivities, heartbeating, undoing
from workflows.models import CapturedImage, CaptureRequest, DeleteRequest


class CaptureActivities(CloudActivities):
    @activity.defn
    async def capture_image(self, request: CaptureRequest) -> CapturedImage:
        async with heartbeating():
            return await self.cloud.capture_image(request.build, request.staging, request.vm, request.spec)

    @activity.defn
    async def delete_image(self, request: DeleteRequest) -> None:
        async with undoing():
            await self.cloud.delete_image(request.build, request.name)
