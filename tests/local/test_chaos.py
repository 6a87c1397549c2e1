"""A short chaos soak (``tests/chaos.py``, ``tests/local/chaos.py``): twelve real local builds, four at a time, meant
to succeed, succeed in part, fail in a customizer, be cancelled and time out, through three worker kills, graceful
stops of a second worker, an Azurite restart and cut SSH connections; each ends as meant, keeps its customization,
and leaves nothing. ``bench/chaos.py`` runs the long one."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from rich.console import Console
from temporalio.client import Client

from tests.chaos import Faults, soak, table
from tests.local.chaos import environment

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(os.geteuid() != 0, reason="local builds need root"),
]


@pytest.mark.timeout(900)
async def test_twelve_builds_through_worker_kills_an_azurite_restart_and_cut_ssh(
    client: Client, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 32)
    faults = Faults(kills=3, others={"Azurite restarts": 1, "SSH drops": 2})
    async with environment(client, tmp_path) as site:
        result = await soak(
            site, count=12, at_once=4, faults=faults, seed=seed, folder=tmp_path, timeout=720, every=(5, 15)
        )
    Console(width=200).print(table([result]))
    done = result.chaos
    # Each fault comes in the first ticks, with a kill, while builds still run.
    assert (done.kills, done.done["Azurite restarts"]) == (3, 1), f"the builds ended before every fault (seed {seed})"
    assert done.done["SSH drops"] >= 1, f"no VM had an SSH session to cut (seed {seed})"
    assert result.mismatches == 0, f"seed {seed}: see the table above"
