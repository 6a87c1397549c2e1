"""ScheduledRunWorkflow: what a kiln schedule's action starts, one run of a template.

It asks the template's entity for a run and, when a build starts, stays open until the build ends: the
schedule's overlap policy (SKIP) sees this workflow, so a schedule never starts a run while its last one still
builds. Its result is the run's record (built, failed, or skipped with why), which ``kiln schedule describe``
shows beside each recent action.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.scheduled import request_run
    from workflows.golden_models import RunRecord, ScheduledRunRequest
    from workflows.policies import REQUEST_RUN_RETRY, REQUEST_RUN_TIMEOUT


@workflow.defn(name="KilnScheduledRun")
class ScheduledRunWorkflow:
    def __init__(self) -> None:
        self._ended: RunRecord | None = None

    @workflow.signal
    def build_ended(self, record: RunRecord) -> None:
        """The template's entity says the build this run started has ended."""
        self._ended = record

    @workflow.run
    async def run(self, request: ScheduledRunRequest) -> RunRecord:
        record = await workflow.execute_activity(
            request_run,
            request,
            start_to_close_timeout=REQUEST_RUN_TIMEOUT,
            retry_policy=REQUEST_RUN_RETRY,
            summary=f"run template {request.template}",
        )
        if record.finished:
            workflow.set_current_details(f"{record.run_state}: {record.message}")
            return record
        workflow.set_current_details(f"building {record.build}")
        await workflow.wait_condition(lambda: self._ended is not None)
        assert self._ended is not None
        workflow.set_current_details(f"{self._ended.run_state} {self._ended.build}")
        return self._ended
