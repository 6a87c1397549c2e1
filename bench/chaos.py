"""The chaos soak: N real local builds through worker kills, Azurite restarts and dropped SSH connections, each
checked for its true end and for leftovers.

    python bench/chaos.py [--builds 50] [--at-once 4] [--kills N] [--storage-restarts N] [--ssh-drops N] [--seed S]

The soak of ``tests/local/chaos.py``: a random mix of builds meant to succeed, fail in a customizer, be
cancelled and time out, ``--at-once`` at a time (the machine's CPUs bound how many VMs boot in time), while the
worker is SIGKILLed at random moments (every 8-30 s, ``--kills`` times, a quarter of the builds by default), a
second worker joins and is stopped, and at the same moments Azurite is restarted or a build VM's SSH sessions are
cut (a tenth of the builds each, by default). One table of every build is printed; the exit code is 1 if any
build ended otherwise than meant, lost its customization or left anything on the machine.

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

from tests.local.chaos import Faults, environment, soak, table
from tests.local.vms import TEST_HOME
from tests.services import start_dev_server, stopped_by_sigterm


async def main(builds: int, at_once: int, faults: Faults, seed: int) -> int:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    console = Console(width=220)
    console.print(f"seed {seed}")
    with tempfile.TemporaryDirectory(prefix="kiln-chaos-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        async with await start_dev_server() as env, environment(env.client, work) as (local, storage):
            result = await soak(
                local, count=builds, at_once=at_once, faults=faults, seed=seed, folder=work, timeout=6 * 3600,
                storage=storage,
            )  # fmt: skip
    console.print(table([result]))
    return 1 if result.mismatches else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=50, help="local builds in all (default 50)")
    parser.add_argument("--at-once", type=int, default=4, help="builds running at the same time (default 4)")
    parser.add_argument("--kills", type=int, help="worker SIGKILLs in all (default a quarter of the builds)")
    parser.add_argument("--storage-restarts", type=int, help="Azurite restarts in all (default a tenth of the builds)")
    parser.add_argument("--ssh-drops", type=int, help="VM SSH sessions cut in all (default a tenth of the builds)")
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 32))
    arguments = parser.parse_args()
    tenth = max(1, arguments.builds // 10)
    faults = Faults(
        kills=arguments.kills if arguments.kills is not None else max(1, arguments.builds // 4),
        storage_restarts=tenth if arguments.storage_restarts is None else arguments.storage_restarts,
        ssh_drops=tenth if arguments.ssh_drops is None else arguments.ssh_drops,
    )
    sys.exit(asyncio.run(stopped_by_sigterm(main(arguments.builds, arguments.at_once, faults, arguments.seed))))
