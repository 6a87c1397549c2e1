"""Output versions over time: revocation (``kiln images revoke``) and retention (``kiln retention``).

Both change gallery versions through activities on the cloud that holds them and tell the owning template's
entity, so ``kiln images`` shows what became of each version.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.images import ImageActivities, collect_lineage
    from workflows.golden_models import (
        RetentionReport,
        RetentionRequest,
        Retirement,
        RetireRequest,
        RevokeRequest,
        entity_id,
    )
    from workflows.policies import LIFECYCLE_RETRY, LIFECYCLE_TIMEOUT
    from workflows.retention import retention_plan


async def retire(request: RetireRequest) -> None:
    await workflow.execute_activity_method(
        ImageActivities.retire_image_version,
        request,
        start_to_close_timeout=LIFECYCLE_TIMEOUT,
        retry_policy=LIFECYCLE_RETRY,
        summary=f"{request.action} {request.version_id.rsplit('/', 1)[-1]}",
    )
    if request.template:
        retirement = Retirement(
            version_id=request.version_id, action=request.action, end_of_life=request.end_of_life, note=request.note
        )
        await workflow.get_external_workflow_handle(entity_id(request.template)).signal("record_retirement", retirement)


@workflow.defn(name="KilnRevokeImages")
class RevokeImagesWorkflow:
    @workflow.run
    async def run(self, request: RevokeRequest) -> list[str]:
        for version in request.versions:
            await retire(version)
        return [v.version_id for v in request.versions]


@workflow.defn(name="KilnRetention")
class RetentionWorkflow:
    """One pass of a template's retention; a schedule of its own runs it again and again."""

    @workflow.run
    async def run(self, request: RetentionRequest) -> RetentionReport:
        lineage = await workflow.execute_activity(
            collect_lineage, start_to_close_timeout=LIFECYCLE_TIMEOUT, retry_policy=LIFECYCLE_RETRY
        )
        kept, in_use, going = retention_plan(lineage, request)
        owners = {o.version_id: o.template for t in lineage for o in t.outputs}
        report = RetentionReport(kept=kept, in_use=in_use, retired=going, dry_run=request.dry_run)
        if request.dry_run:
            return report
        action = "deleted" if request.action == "delete" else "end-of-life"
        for version_id in going:
            await retire(
                RetireRequest(
                    version_id=version_id,
                    action=action,
                    end_of_life=workflow.now(),
                    note=f"retention: keep newest {request.keep}",
                    template=owners.get(version_id, ""),
                )
            )
        return report
