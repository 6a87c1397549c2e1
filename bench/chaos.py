"""The chaos soak: N real builds on the local cloud and N on the Azure cloud (the ARM emulator), through worker kills
and their surroundings failing, each checked for its true end and for leftovers.

    python bench/chaos.py [--builds 50] [--clouds local,azure] [--at-once 4] [--kills N] [--storage-restarts N]
                          [--ssh-drops N] [--arm-bursts N] [--seed S]

The soak of ``tests/chaos.py``, on each cloud in turn: a random mix of builds meant to succeed, succeed in part,
fail in a customizer, be cancelled and time out, ``--at-once`` at a time (the machine's CPUs bound how many VMs
boot in time), while the worker is SIGKILLed at random moments (every 8-30 s, ``--kills`` times, a quarter of the
builds by default), a second worker joins and is stopped, and at the same moments Azurite is restarted, a build
VM's SSH sessions are cut, and (on Azure) ARM answers a burst of 429s or of 500s: a tenth of the builds each, by
default. One table of every build is printed; the exit code is 1 if any build ended otherwise than meant, lost its
customization or left anything behind.

Runs as root on the state folder the local tests use ($KILN_TEST_HOME, else /var/tmp/kiln-test). Temporal (a dev
server), Azurite and the ARM emulator are started for the run and stopped after it.
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

from tests.azure import chaos as azure_chaos
from tests.chaos import Faults, SoakResult, soak, table
from tests.local import chaos as local_chaos
from tests.local.vms import TEST_HOME
from tests.services import start_dev_server, stopped_by_sigterm

SITES = {"local": local_chaos.environment, "azure": azure_chaos.environment}


async def main(clouds: list[str], builds: int, at_once: int, faults: Faults, seed: int) -> int:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    console = Console(width=220)
    console.print(f"seed {seed}")
    results: list[SoakResult] = []
    async with await start_dev_server() as env:
        for cloud in clouds:
            with tempfile.TemporaryDirectory(prefix=f"kiln-chaos-{cloud}-", dir="/var/tmp") as scratch:
                async with SITES[cloud](env.client, Path(scratch)) as site:
                    result = await soak(
                        site, count=builds, at_once=at_once, faults=faults, seed=seed, folder=Path(scratch),
                        timeout=6 * 3600,
                    )  # fmt: skip
            console.print(table([result]))
            results.append(result)
    if len(results) > 1:
        console.print(table(results))
    return 1 if any(r.mismatches for r in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=50, help="builds on each cloud (default 50)")
    parser.add_argument("--clouds", default="local,azure", help="the clouds to soak, in turn (default local,azure)")
    parser.add_argument("--at-once", type=int, default=4, help="builds running at the same time (default 4)")
    parser.add_argument("--kills", type=int, help="worker SIGKILLs on each cloud (default a quarter of the builds)")
    parser.add_argument("--storage-restarts", type=int, help="Azurite restarts (default a tenth of the builds)")
    parser.add_argument("--ssh-drops", type=int, help="VM SSH sessions cut (default a tenth of the builds)")
    parser.add_argument(
        "--arm-bursts", type=int, help="ARM bursts of 429s, and of 500s (default a tenth of the builds)"
    )
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 32))
    arguments = parser.parse_args()
    clouds = arguments.clouds.split(",")
    if unknown := set(clouds) - set(SITES):
        parser.error(f"--clouds: no cloud {', '.join(sorted(unknown))}; the clouds are {', '.join(SITES)}")
    tenth = max(1, arguments.builds // 10)

    def given(value: int | None) -> int:
        return tenth if value is None else value

    bursts = given(arguments.arm_bursts)
    faults = Faults(
        kills=arguments.kills if arguments.kills is not None else max(1, arguments.builds // 4),
        others={
            "Azurite restarts": given(arguments.storage_restarts),
            "SSH drops": given(arguments.ssh_drops),
            "ARM 429 bursts": bursts,
            "ARM 500 bursts": bursts,
        },
    )
    code = asyncio.run(stopped_by_sigterm(main(clouds, arguments.builds, arguments.at_once, faults, arguments.seed)))
    sys.exit(code)
