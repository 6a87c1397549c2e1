"""What every activity shares: the cloud it works on, a heartbeat while a long call runs, and how an undo tells
a failure that retrying may fix from one it never will."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.clouds.base import Cloud, PermanentError

if TYPE_CHECKING:
    from activities.guest import Guests

HEARTBEAT_EVERY = 2.0
# An undo that fails with the very same error this many times in a row is stuck: what it meets is no passing
# fault, and trying it forever would keep its build Running for good. With the undos' backoff (2 s doubling to a
# minute) eight attempts span about three minutes. KILN_CLEANUP_STUCK_AFTER changes it.
CLEANUP_STUCK_AFTER = 8
CLEANUP_STUCK = "CleanupStuck"


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


@asynccontextmanager
async def undoing() -> AsyncIterator[None]:
    """Heartbeat while an undo runs, and count how many attempts in a row failed with the same error (in the
    heartbeat details, which the next attempt gets back, on whichever worker). At ``CLEANUP_STUCK_AFTER`` the
    undo stops being retried: it fails as ``CleanupStuck``, which the build reports and leaves for the janitor.
    A different error starts the count again."""
    details = activity.info().heartbeat_details
    streak: dict[str, Any] = details[0] if details and isinstance(details[0], dict) else {}
    try:
        async with heartbeating(streak):  # a worker that dies mid-attempt keeps the count as it was
            yield
    except PermanentError:
        raise
    except Exception as err:
        failure = f"{type(err).__name__}: {err}"[:2000]
        times = streak.get("times", 0) + 1 if streak.get("failure") == failure else 1
        if times >= int(os.environ.get("KILN_CLEANUP_STUCK_AFTER", CLEANUP_STUCK_AFTER)):
            raise ApplicationError(
                f"failed the same way {times} times in a row: {failure}", type=CLEANUP_STUCK, non_retryable=True
            ) from err
        activity.heartbeat({"failure": failure, "times": times})
        raise
