"""A whole local build of the demo template without its package install: end-to-end time and each step's.

    python bench/bench_local_build.py [--runs 1]

The template is examples/debian-golden.json less its apt-get step (inline scripts, a scriptUri, a File, a validator;
a VHD and a gallery in three regions). Runs as root on the state folder the local tests use ($KILN_TEST_HOME, else
/var/tmp/kiln-test), so the Debian base is made only if no earlier run made it; that make is timed apart. Temporal
(a dev server) and Azurite are started for the run and stopped after it. Targets: the build at most 30 s end to
end, create to SSH-ready at most 2 s (the "create build VM" step also holds the activity's dispatch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.clouds.local.azurite import start_azurite
from activities.clouds.local.images import OFFERS
from activities.clouds.local.records import ResourceStore
from tests.local.builds import FileServer, serving
from tests.local.vms import TEST_HOME
from tests.services import free_port, temporal_cli
from workflows.models import SEARCH_ATTRIBUTES, BuildStatus, RunState

PROJECT = Path(__file__).resolve().parents[1]
DEMO = PROJECT / "examples" / "debian-golden.json"
DEMO_FILES = "http://127.0.0.1:8780/"


def demo_without_packages(files: FileServer) -> dict:
    """The demo template less the apt-get step and the validator's check of its package, its URIs served here."""
    text = DEMO.read_text().replace(DEMO_FILES, files.url(""))
    template = json.loads(text)
    properties = template["properties"]
    properties["customize"] = [c for c in properties["customize"] if c["name"] != "installPackages"]
    for validator in properties["validate"]["inVMValidations"]:
        validator["inline"] = [line for line in validator["inline"] if "command -v tree" not in line]
    return template


def print_steps(status: BuildStatus, total: float) -> None:
    print(f"end to end (start to result): {total:.2f} s  [{status.run_state}]")
    for step in status.steps:
        seconds = (step.ended - step.started).total_seconds() if step.ended else float("nan")
        print(f"  {seconds:7.2f} s  {step.name}")
    figures = {
        "create build VM": "create to SSH-ready",
        "create validation VM": "unpack the image, create to SSH-ready",
    }
    for name, what in figures.items():
        step = next((s for s in status.steps if s.name == name and s.ended), None)
        if step is not None:
            print(f"{name} ({what}): {(step.ended - step.started).total_seconds():.2f} s")


async def main(runs: int) -> None:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as scratch:
        azurite = await start_azurite(location=Path(scratch) / "azurite", port=free_port())
        try:
            async with (
                await WorkflowEnvironment.start_local(
                    dev_server_existing_path=temporal_cli(),
                    data_converter=pydantic_data_converter,
                    search_attributes=SEARCH_ATTRIBUTES,
                    ui=False,
                    dev_server_log_level="error",
                ) as env,
                serving(
                    env.client,
                    azurite.endpoint,
                    TEST_HOME,
                    ResourceStore(TEST_HOME / "resources.db"),
                    PROJECT / "examples",
                ) as builds,
            ):
                started = time.monotonic()
                debian = next(o for o in OFFERS if (o.offer, o.sku) == ("debian-12", "12-gen2"))
                base = await builds.cloud.images.resolve(debian, "latest")
                print(f"Debian 12 base {base.version}: {time.monotonic() - started:.2f} s (made now if not cached)")
                template = demo_without_packages(builds.files)
                gallery = next(d for d in template["properties"]["distribute"] if d["type"] == "SharedImage")
                gallery["galleryImageId"] = await builds.make_gallery()
                for run in range(runs):
                    started = time.monotonic()
                    build = await builds.start(template, prefix="bench")
                    status = await builds.finish(build)
                    print(f"-- run {run + 1} of {runs}")
                    print_steps(status, time.monotonic() - started)
                    if status.run_state != RunState.SUCCEEDED:
                        print(f"the build did not succeed: {status.message}")
        finally:
            await azurite.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="builds to run one after another")
    asyncio.run(main(parser.parse_args().runs))
