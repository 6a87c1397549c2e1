"""The suite's first test: the machine has every program kiln runs, as deploy/setup-debian.sh installs them.

A missing install step then fails the run in seconds, naming the program and its package, instead of surfacing
minutes later as a VM that never boots.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "deploy" / "setup-debian.sh"


def test_setup_check_finds_every_program_kiln_runs() -> None:
    check = subprocess.run(["bash", str(SETUP), "--check"], capture_output=True, text=True, timeout=60)
    missing = [line for line in check.stderr.splitlines() if line.startswith("MISSING")]
    if check.returncode != 0:
        # Everything after this would fail slowly for the same reason: stop the run here.
        pytest.exit(f"deploy/setup-debian.sh --check failed:\n{check.stderr}", returncode=1)
    assert not missing
