"""The build VM (and the validation VM, made the same way from the captured image)."""

from __future__ import annotations

from temporalio import activity

from activities.common import CloudActivities, heartbeating, undoing
from workflows.models import BuildVm, CreateVmRequest, DeleteRequest


class BuildVmActivities(CloudActivities):
    @activity.defn
    async def create_vm(self, request: CreateVmRequest) -> BuildVm:
        async with heartbeating():
            return await self.cloud.create_vm(request.build, request.staging, request.spec)

    @activity.defn
    async def delete_vm(self, request: DeleteRequest) -> None:
        async with undoing():
            await self.cloud.delete_vm(request.build, request.name)
