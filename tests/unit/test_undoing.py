"""How an undo counts its failures across attempts (``activities.common.undoing``): the same error again and again
is stuck and stops being retried; another error starts the count over. Run as a retry runs, with the heartbeat
details the previous attempt left."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.common import CLEANUP_STUCK, undoing

FAILURE = "RuntimeError: the disk is still attached"


def attempt(details: dict[str, Any], beats: list[Any]) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(ActivityEnvironment.default_info(), attempt=2, heartbeat_details=[details])
    env.on_heartbeat = lambda *d: beats.append(d[0] if d else None)
    return env


async def failing_undo(message: str) -> None:
    async with undoing():
        raise RuntimeError(message)


async def test_the_same_failure_again_and_again_stops_the_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CLEANUP_STUCK_AFTER", "3")
    beats: list[Any] = []
    with pytest.raises(ApplicationError) as stuck:
        await attempt({"failure": FAILURE, "times": 2}, beats).run(failing_undo, "the disk is still attached")
    assert stuck.value.type == CLEANUP_STUCK and stuck.value.non_retryable
    assert stuck.value.message == f"failed the same way 3 times in a row: {FAILURE}"


async def test_another_failure_starts_the_count_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CLEANUP_STUCK_AFTER", "3")
    beats: list[Any] = []
    with pytest.raises(RuntimeError, match="throttled"):
        await attempt({"failure": FAILURE, "times": 2}, beats).run(failing_undo, "throttled")
    assert beats[-1] == {"failure": "RuntimeError: throttled", "times": 1}
