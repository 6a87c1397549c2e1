"""How kiln waits on work Azure does in the background that no long-running operation covers: a snapshot's copy
into another region, a server-side blob copy, a gallery version found without its poller.

Such work takes minutes to hours and every look at it is an ARM (or storage) read, throttled per subscription and
provider, so kiln looks every 15 s at first and backs off to every 30 s. Long-running operations are left to the
SDK's own poller, which sleeps what ARM's Retry-After asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """The pauses between looks: ``first``, then each ``factor`` times the last, never more than ``most`` (seconds).

    ``sleep`` is how a pause is taken; tests pass one that records the pauses instead of taking them.
    """

    first: float = 15.0
    most: float = 30.0
    factor: float = 1.5
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def pauses(self) -> AsyncIterator[None]:
        """Yields after each pause, for ever: ``await anext(pauses)`` before each new look."""
        delay = self.first
        while True:
            await self.sleep(delay)
            yield
            delay = min(self.most, delay * self.factor)
