"""kiln's own metrics, beside the Temporal SDK's on the worker's Prometheus endpoint (``--metrics-port``).

The workflow's are recorded through ``workflow.metric_meter()``, which records nothing while a history is
replayed, so a build counts once however often a worker replays it. Every metric carries the SDK's own labels
too (``namespace``, ``task_queue``, ``workflow_type``).

* ``kiln_builds{run_state, cloud}``: builds that entered each runState (Running when a build starts).
* ``kiln_step_duration{step_kind, outcome, cloud}``: each build step's time, by kind (``customize``,
  ``capture image``, ``distribute SharedImage``, ...).
* ``kiln_resources_created{kind, cloud}`` / ``kiln_resources_deleted{kind, cloud}``: cloud resources builds made
  and their cleanups (or the janitor) deleted.
* ``kiln_undos_left{cloud}``: undos a build's cleanup could not finish, left for the janitor.
* ``kiln_cleanup_retries{undo}``: undo attempts after the first (activity side).
* ``kiln_boot_check_duration{accelerator}``: the local cloud's boot checks, from power-on to SSH (activity side).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import timedelta

from temporalio import workflow

BUILDS = "kiln_builds"
STEP_DURATION = "kiln_step_duration"
RESOURCES_CREATED = "kiln_resources_created"
RESOURCES_DELETED = "kiln_resources_deleted"
UNDOS_LEFT = "kiln_undos_left"
CLEANUP_RETRIES = "kiln_cleanup_retries"
BOOT_CHECK_DURATION = "kiln_boot_check_duration"

# Seconds: steps take from a second (resolve source) to hours (customize, replicate); a boot one to ten minutes.
BUCKETS = {
    STEP_DURATION: [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400],
    BOOT_CHECK_DURATION: [5, 10, 20, 30, 60, 90, 120, 180, 300, 600],
}

_NUMBERED = re.compile(r" \d+/\d+:.*$")


def step_kind(name: str) -> str:
    """A step's kind, a label of few values: ``customize 2/4: harden`` is ``customize``, ``distribute
    SharedImage gallery`` is ``distribute SharedImage``."""
    name = _NUMBERED.sub("", name)
    return " ".join(name.split()[:2]) if name.startswith("distribute ") else name


class BuildMetrics:
    """The metrics one build (or janitor run) records, labelled with its cloud. Make it inside the workflow."""

    def __init__(self) -> None:
        meter = workflow.metric_meter()
        self._builds = meter.create_counter(BUILDS, "builds that entered each runState")
        self._steps = meter.create_histogram_timedelta(STEP_DURATION, "time each build step took", "duration")
        self._created = meter.create_counter(RESOURCES_CREATED, "cloud resources builds made")
        self._deleted = meter.create_counter(RESOURCES_DELETED, "cloud resources cleanups deleted")
        self._left = meter.create_counter(UNDOS_LEFT, "undos a cleanup left for the janitor")

    def entered(self, run_state: str, cloud: str) -> None:
        self._builds.add(1, {"run_state": run_state, "cloud": cloud})

    def step(self, name: str, outcome: str, took: timedelta, cloud: str) -> None:
        self._steps.record(took, {"step_kind": step_kind(name), "outcome": outcome, "cloud": cloud})

    def created(self, kinds: Iterable[str], cloud: str) -> None:
        for kind in kinds:
            self._created.add(1, {"kind": kind, "cloud": cloud})

    def deleted(self, kinds: Iterable[str], cloud: str) -> None:
        for kind in kinds:
            self._deleted.add(1, {"kind": kind, "cloud": cloud})

    def left(self, count: int, cloud: str) -> None:
        if count:
            self._left.add(count, {"cloud": cloud})
