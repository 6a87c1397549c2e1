"""Start a kiln build from Python and print its run outputs: ``kiln build`` in a dozen lines.

    python examples/start_build.py TEMPLATE.json [--name NAME] [--cloud local|azure]

A build is the ``ImageBuild`` workflow, started with the plain AIB template as its only input, on the task
queue of the cloud that should build it; its workflow id is the build's name. A worker for that cloud must be
running (``python worker.py --dev`` starts one with a local Temporal server). The connection settings are
Temporal's own (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TLS files), as for the ``kiln`` CLI.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from temporalio.client import WorkflowFailureError

from activities.clouds.registry import CLOUDS, task_queue
from activities.connection import connect
from workflows.models import BuildStatus
from workflows.template import load_template


async def start_build(path: Path, *, name: str | None = None, cloud: str = "local") -> BuildStatus:
    """Build the image ``path`` describes and return the final status (runState, runOutputs, message).

    Raises:
        TemplateError: the template is not valid; its ``issues`` name each problem.
        WorkflowFailureError: the build failed (``cause.message`` names the step and the log) or was canceled.
    """
    template, arm_name = load_template(path)  # resolves an ARM wrapper and validates, before anything starts
    client = await connect()  # kiln's data converter: the result comes back as a BuildStatus
    handle = await client.start_workflow(
        "ImageBuild",
        template,
        id=name or arm_name or path.stem,
        task_queue=task_queue(cloud),
        result_type=BuildStatus,
    )
    return await handle.result()


async def main() -> int:
    parser = argparse.ArgumentParser(description="Start a kiln build and print its run outputs.")
    parser.add_argument("template", type=Path)
    parser.add_argument("--name")
    parser.add_argument("--cloud", choices=sorted(CLOUDS), default="local")
    args = parser.parse_args()
    try:
        status = await start_build(args.template, name=args.name, cloud=args.cloud)
    except WorkflowFailureError as err:
        print(f"build failed: {err.cause}")
        return 1
    print(status.run_state + (f": {status.message}" if status.message else ""))
    for output in status.run_outputs:
        print(f"{output.run_output_name} ({output.type}): {output.artifact_id or output.artifact_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
