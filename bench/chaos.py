"""The chaos soak: N real local builds through worker kills, each checked for its true end and for leftovers.

    python bench/chaos.py [--builds 50] [--at-once 8] [--kills-per-round 3] [--seed S]

Builds run in rounds of ``--at-once`` (the machine's CPUs and memory bound how many VMs it can hold), each
round a soak of ``tests/local/chaos.py``: a random mix of builds meant to succeed, fail in a customizer, be
cancelled and time out, while the worker is SIGKILLed at random moments and a second worker joins and is
stopped. One table of every build is printed; the exit code is 1 if any build ended otherwise than meant, lost
its customization or left anything on the machine.

Runs as root on the state folder the local tests use ($KILN_TEST_HOME, else /var/tmp/kiln-test). Temporal (a
dev server) and Azurite are started for the run and stopped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.clouds.local.azurite import start_azurite
from activities.clouds.local.records import ResourceStore
from tests.local.builds import serving
from tests.local.chaos import SoakResult, soak, table
from tests.local.vms import TEST_HOME
from tests.services import free_port, temporal_cli
from workflows.models import SEARCH_ATTRIBUTES


async def main(builds: int, at_once: int, kills: int, seed: int) -> int:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    console = Console(width=220)
    console.print(f"seed {seed}")
    results: list[SoakResult] = []
    with tempfile.TemporaryDirectory(prefix="kiln-chaos-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        (work / "files").mkdir()
        azurite = await start_azurite(location=work / "azurite", port=free_port())
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
                    env.client, azurite.endpoint, TEST_HOME, ResourceStore(TEST_HOME / "resources.db"), work / "files"
                ) as local,
            ):
                left = builds
                round_number = 0
                while left > 0:
                    count = min(at_once, left)
                    result = await soak(
                        local, count=count, kills=kills, seed=seed + round_number, folder=work, timeout=1800
                    )
                    results.append(result)
                    console.print(
                        f"round {round_number + 1}: {count} builds in {result.seconds:.0f} s, {result.kills} kills, "
                        f"{result.stops} stops, {result.mismatches} with problems"
                    )
                    left -= count
                    round_number += 1
        finally:
            await azurite.stop()
    console.print(table(results))
    return 1 if any(r.mismatches for r in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=50, help="local builds in all (default 50)")
    parser.add_argument("--at-once", type=int, default=8, help="builds running at the same time (default 8)")
    parser.add_argument("--kills-per-round", type=int, default=3, help="worker SIGKILLs in each round (default 3)")
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 32))
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.builds, arguments.at_once, arguments.kills_per_round, arguments.seed)))
