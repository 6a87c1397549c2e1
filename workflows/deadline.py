"""The build's deadline: buildTimeoutInMinutes as a timer inside the workflow, which a set_deadline update moves.

After temporalio samples-python ``updatable_timer``: the wait starts over whenever the deadline moves.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow


class Deadline:
    """When the build times out. A timer in workflow code, not a workflow timeout, so a build that reaches it
    still runs its cleanup."""

    def __init__(self, at: datetime) -> None:
        self.at = at
        self._moves = 0

    @property
    def moved(self) -> bool:
        """Whether an update ever moved it: the timeout message says so."""
        return self._moves > 0

    def move(self, at: datetime) -> None:
        """Make ``at`` the deadline, sooner or later; a wait under way starts over against it."""
        self.at = at
        self._moves += 1

    async def wait(self, done: Callable[[], bool]) -> bool:
        """Wait until ``done()`` or the deadline, however often it moves meanwhile.

        Returns:
            True if the deadline came first.

        Raises:
            asyncio.CancelledError: a client asked to cancel the workflow meanwhile.
        """
        while not done():
            if await self._timed_out(done):
                return True
        return False

    async def _timed_out(self, done: Callable[[], bool]) -> bool:
        """Wait for ``done()``, the deadline, or its next move; True if the deadline came."""
        moves = self._moves
        # A deadline already past still fires through a (shortest) timer.
        remaining = max(self.at - workflow.now(), timedelta(milliseconds=1))
        try:
            await workflow.wait_condition(lambda: done() or self._moves != moves, timeout=remaining)
        except TimeoutError:
            return True
        return False
