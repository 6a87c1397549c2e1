"""What every activity shares: the cloud it works on and a heartbeat while a long call runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from temporalio import activity

from activities.clouds.base import Cloud

if TYPE_CHECKING:
    from activities.guest import Guests

HEARTBEAT_EVERY = 2.0


class CloudActivities:
    """Activities bound to one cloud, and to the guest profiles that reach its VMs. A worker serves one cloud on
    its task queue (``kiln-local``, ``kiln-azure``)."""

    def __init__(self, cloud: Cloud, guests: Guests) -> None:
        self.cloud = cloud
        self.guests = guests


class Heartbeat:
    """A step's heartbeat details, kept current: every heartbeat sends the latest, so the resume point a retry of
    the step reads back (``activity.info().heartbeat_details``) is never overwritten by an empty one."""

    def __init__(self, *details: Any) -> None:
        self.details = details

    def beat(self, *details: Any) -> None:
        """Heartbeat now, with ``details`` as the new resume point if given."""
        if details:
            self.details = details
        activity.heartbeat(*self.details)


@asynccontextmanager
async def heartbeating(*details: Any) -> AsyncIterator[Heartbeat]:
    """Heartbeat in the background while one long cloud call runs.

    Without heartbeats a worker that died is noticed only at start_to_close, and a cancel is never delivered
    to the activity, so the saga could not wait for a half-made resource to settle before deleting it.
    """
    heartbeat = Heartbeat(*details)

    async def beat() -> None:
        while True:
            heartbeat.beat()
            await asyncio.sleep(HEARTBEAT_EVERY)

    task = asyncio.create_task(beat())
    try:
        yield heartbeat
    finally:
        task.cancel()
