"""A worker that is stopped (SIGTERM, SIGINT) hands its running steps over at once instead of dropping them.

Temporal cancels the activities still running when a worker's graceful shutdown time is up, but a cancel the
server never asked for cannot be reported as one: the step would sit until its heartbeat timed out. Every step
can be taken over (scripts run detached in the guest, creates are create-or-get, distributions resume), so the
stopping worker fails it with a retryable error instead, and the server gives it to another worker right away.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

WORKER_STOPPED = "WorkerStopped"


def worker_stopping() -> bool:
    """Whether the running activity is being cancelled because its worker stops, not because its build was."""
    details = activity.cancellation_details()
    return details is not None and details.worker_shutdown and not details.cancel_requested


class HandOverOnShutdown(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _HandOver(next)


class _HandOver(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except asyncio.CancelledError:
            if worker_stopping():
                raise ApplicationError(
                    "the worker stopped; another worker takes the step over", type=WORKER_STOPPED
                ) from None
            raise
