"""What every activity shares: the cloud it works on and a heartbeat while a long call runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from temporalio import activity

from activities.clouds.base import Cloud
from activities.guest import Guests

HEARTBEAT_EVERY = 2.0


class CloudActivities:
    """Activities bound to one cloud, and to the guest profiles that reach its VMs. A worker serves one cloud on
    its task queue (``kiln-local``, ``kiln-azure``)."""

    def __init__(self, cloud: Cloud, guests: Guests) -> None:
        self.cloud = cloud
        self.guests = guests


@asynccontextmanager
async def heartbeating(*details: Any) -> AsyncIterator[None]:
    """Heartbeat in the background while one long cloud call runs.

    Without heartbeats a worker that died is noticed only at start_to_close, and a cancel is never delivered
    to the activity, so the saga could not wait for a half-made resource to settle before deleting it.
    """

    async def beat() -> None:
        while True:
            activity.heartbeat(*details)
            await asyncio.sleep(HEARTBEAT_EVERY)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
