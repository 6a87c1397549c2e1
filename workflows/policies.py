"""How long each activity of the build and the janitor may take, how it is retried, and what a cancel waits for.

In one place so that each is set knowing the others; every one says why it is what it is. Activities heartbeat
every 2 seconds (``activities.common``), which the heartbeat timeouts below are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

# -- validating the template (a local activity)

# Parsing a template is milliseconds of CPU: half a minute means a stuck worker, and the retry goes to another.
VALIDATE_TIMEOUT = timedelta(seconds=30)
# A bad template fails at once (non-retryable); anything else is a bug, retried until a fixed worker takes over.
VALIDATE_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1))

# -- build steps

# One attempt of a cloud call: the slowest ARM long-running operation, or a first local base image, fits in it.
STEP_TIMEOUT = timedelta(minutes=30)
# Deprovisioning cleans the guest and syncs its whole disk, which may outlast a cloud call.
DEPROVISION_TIMEOUT = timedelta(hours=1)
# Capture reads the whole OS disk and writes it as an image.
CAPTURE_TIMEOUT = timedelta(hours=2)
# A worker that died mid-step is noticed within seconds and its step retried elsewhere, not at STEP_TIMEOUT.
# Every step heartbeats every 2 s, even while one guest poll or cloud call is slow, and the worker sends them at
# least that often: 8 s is four heartbeats missed.
STEP_HEARTBEAT = timedelta(seconds=8)
# Transient cloud errors (a 500, throttling) cost retries with backoff; a non-retryable error fails the step at once.
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1), maximum_attempts=8
)
# A cancelled step has stopped before the saga goes on, so an undo never races a half-made resource.
WAIT_FOR_CANCEL = workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED


# -- undos


@dataclass(frozen=True, kw_only=True)
class UndoPolicy:
    """How an undo activity runs: the build's own cleanup, or the janitor's later one."""

    start_to_close_timeout: timedelta
    heartbeat_timeout: timedelta
    retry_policy: RetryPolicy
    cancellation_type: workflow.ActivityCancellationType = workflow.ActivityCancellationType.TRY_CANCEL
    schedule_to_close_timeout: timedelta | None = None


BUILD_UNDO = UndoPolicy(
    start_to_close_timeout=STEP_TIMEOUT,
    heartbeat_timeout=STEP_HEARTBEAT,
    # Cleanup never gives up on a transient error: a leaked VM costs more than a slow cleanup.
    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1)),
    # An undo the build frees early (its VM, once captured) has stopped before the final cleanup runs it again.
    cancellation_type=WAIT_FOR_CANCEL,
)

# -- the janitor

# It asks every closed build of the lookback for its status, a few at a time.
JANITOR_FIND_TIMEOUT = timedelta(minutes=10)
# It heartbeats after each status query, and a query may take up to its own 10 second timeout.
JANITOR_FIND_HEARTBEAT = timedelta(minutes=1)
# A look-up that keeps failing is the next scheduled run's to try again.
JANITOR_FIND_RETRY = RetryPolicy(maximum_attempts=3)

JANITOR_UNDO = UndoPolicy(
    # A queue whose cloud has no worker any more must not hold the janitor forever.
    schedule_to_close_timeout=timedelta(hours=1),
    start_to_close_timeout=timedelta(minutes=30),
    heartbeat_timeout=timedelta(seconds=30),
    # Bounded, unlike the build's cleanup: what still fails is reported, and the next run tries it again.
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1), maximum_attempts=10
    ),
    # Nothing is built after it, so a cancel need not wait for a delete (running one again is harmless).
    cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL,
)

# -- the image template entity

# Resolving a source is one cloud read (a first local base may be made in it, as a first build makes it).
SOURCE_CHECK_TIMEOUT = timedelta(minutes=30)
# A source that cannot be resolved now is the next interval's to try; the trigger says so meanwhile.
SOURCE_CHECK_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_attempts=3)
# A webhook down for a while still hears of the event, later; one down for a day does not hold the entity.
NOTIFY_TIMEOUT = timedelta(hours=24)
# One attempt is one POST (notify.py's ends 10 s sooner): an attempt whose worker died is tried again after this,
# not once the day is out.
NOTIFY_ATTEMPT_TIMEOUT = timedelta(seconds=30)
NOTIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(minutes=10)
)
# A schedule's run asks its template to build; the template answers at once (it starts or skips).
REQUEST_RUN_TIMEOUT = timedelta(minutes=1)
REQUEST_RUN_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=5)

# -- output versions' lifecycle (revocation, retention)

# One gallery version update or delete, or reading every template's lineage.
LIFECYCLE_TIMEOUT = timedelta(minutes=30)
LIFECYCLE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1), maximum_attempts=10
)
