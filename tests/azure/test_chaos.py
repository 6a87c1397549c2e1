"""A short chaos soak of the Azure cloud (``tests/chaos.py``, ``tests/azure/chaos.py``): twelve builds through the ARM
emulator and real SSH guests, four at a time, meant to succeed, succeed in part, fail in a customizer, be
cancelled and time out, through three worker kills, graceful stops of a second worker, an Azurite restart, bursts
of 429 and 500 answers from ARM and cut SSH connections; each ends as meant, shows its customization, and leaves
nothing but its outputs. ``bench/chaos.py`` runs the long one."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from rich.console import Console
from temporalio.client import Client

from tests.azure.chaos import environment
from tests.chaos import Faults, soak, table

BURSTS = ("ARM 429 bursts", "ARM 500 bursts")


@pytest.mark.timeout(600)
async def test_twelve_builds_through_worker_kills_arm_bursts_an_azurite_restart_and_cut_ssh(
    client: Client, directory: Path
) -> None:
    seed = random.randrange(1 << 32)
    faults = Faults(kills=3, others={"Azurite restarts": 1, "SSH drops": 1, **dict.fromkeys(BURSTS, 1)})
    async with environment(client, directory) as site:
        result = await soak(
            site, count=12, at_once=4, faults=faults, seed=seed, folder=directory, timeout=480, every=(1, 3)
        )
    Console(width=200).print(table([result]))
    done = result.chaos
    # A fault comes every second or three, with a kill until there have been three: all before the builds end.
    did = {"kills": done.kills, **{name: done.done[name] for name in (*BURSTS, "Azurite restarts")}}
    assert did == {"kills": 3, **dict.fromkeys((*BURSTS, "Azurite restarts"), 1)}, f"builds ended first: {did}"
    assert result.mismatches == 0, f"seed {seed}: see the table above"
