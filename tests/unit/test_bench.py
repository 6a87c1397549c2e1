"""The benches stay runnable (running them for their figures is `make bench`).

A bench that needs only this repository's emulators and Azurite runs whole here in a tiny mode (one build, no
load), so one whose wiring broke fails here, not at the next `make bench`; the figures it prints are not judged.
The benches that take minutes however small they are asked to be are exempt, and only their start-up (imports and
--help) is checked here: the local-cloud ones boot real build VMs (systemd-nspawn, QEMU), the golden-image one
skips through weeks of schedules, the recovery one waits out heartbeat timeouts after killing workers, the scale one starts four workers.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.azure.environment import guests_supported

BENCHES = sorted((Path(__file__).parents[2] / "bench").glob("bench_*.py"))
# Arguments of a bench's tiny run, and lines its output must have.
TINY = {
    "bench_azure": (["--builds", "1", "--in-flight", "0"], ["[Succeeded]", "(b) ARM calls of build 1"]),
    "bench_windows": (["--builds", "1"], ["[Succeeded]", "(a) median over the builds", "(c) listener back"]),
    "bench_local_storage": (["--used-mib", "4", "--regions", "1"], ["VHD upload:", "replication to 1 regions"]),
}
ONLY_STARTED = {"bench_local_vm", "bench_local_build", "bench_golden", "bench_recovery", "bench_scale"}


def run(bench: Path, *arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(bench), *arguments], capture_output=True, text=True, timeout=timeout)


def test_every_bench_runs_here_or_is_exempt_by_name() -> None:
    assert {b.stem for b in BENCHES} == TINY.keys() | ONLY_STARTED


@pytest.mark.parametrize("bench", [b for b in BENCHES if b.stem in ONLY_STARTED], ids=lambda p: p.stem)
def test_a_bench_too_long_for_the_suite_starts(bench: Path) -> None:
    started = run(bench, "--help", timeout=60)
    assert started.returncode == 0, started.stderr
    assert "usage:" in started.stdout


@pytest.mark.parametrize("bench", [b for b in BENCHES if b.stem in TINY], ids=lambda p: p.stem)
def test_bench_runs_whole_in_its_tiny_mode(bench: Path, tmp_path: Path) -> None:
    if bench.stem == "bench_azure" and not asyncio.run(guests_supported(tmp_path)):
        pytest.skip("bench_azure's Linux guests need root and overlayfs over /")
    arguments, lines = TINY[bench.stem]
    ran = run(bench, *arguments, timeout=180)
    assert ran.returncode == 0, ran.stderr[-3000:]
    missing = [line for line in lines if line not in ran.stdout]
    assert not missing, ran.stdout[-3000:]
