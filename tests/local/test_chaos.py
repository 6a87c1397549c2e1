"""A short chaos soak (``tests/local/chaos.py``): twelve real local builds, four at a time, meant to succeed, fail in a
customizer, be cancelled and time out, through three worker kills and graceful stops of a second worker; each
ends as meant, keeps its customization, and leaves nothing. ``bench/chaos.py`` runs the long one."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from rich.console import Console

from tests.local.builds import LocalBuilds
from tests.local.chaos import soak, table

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(os.geteuid() != 0, reason="local builds need root"),
]


@pytest.mark.timeout(900)
async def test_twelve_builds_through_three_worker_kills(local_builds: LocalBuilds, tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    result = await soak(
        local_builds, count=12, at_once=4, kills=3, seed=seed, folder=tmp_path, timeout=720, every=(5, 15)
    )
    Console(width=200).print(table([result]))
    assert result.kills == 3, f"the builds ended before three kills (seed {seed})"
    assert result.mismatches == 0, f"seed {seed}: see the table above"
