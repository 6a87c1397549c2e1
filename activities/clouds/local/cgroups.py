"""A local VM's cgroups: its vmSize as CPU and memory limits, and the one place every process of the VM is found.

A VM's first process joins its cgroups before it starts anything, so every process the VM ever runs (its
container or QEMU, its network helper, the guest's own) is listed there, whatever became of the worker that
made it. Stopping a VM for good is killing what its cgroups list until they list nothing; removing them is a
no-op when they are already gone. Where the machine allows no cgroups (a read-only or delegated tree), a VM runs
unlimited and is stopped through its pid files instead.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
from pathlib import Path

from activities.clouds.local.sizes import VmLimits

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "kiln"
EMPTY_TIMEOUT_SECONDS = 10.0


def cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def cgroup_dirs(name: str) -> dict[str, Path]:
    """The VM's cgroup folder per controller (one folder for all of them on cgroup v2)."""
    if cgroup_v2():
        return {"unified": CGROUP_ROOT / PARENT / name}
    controllers = ("cpu", "memory", "cpuset")
    return {c: CGROUP_ROOT / c / PARENT / name for c in controllers if (CGROUP_ROOT / c).is_dir()}


def make_cgroups(name: str, limits: VmLimits) -> list[Path]:
    """The VM's cgroups, limited to its size's CPUs and memory; none where the machine does not allow it.

    Whole vCPUs also get a cpuset of that many CPUs, so ``nproc`` in the guest (and ``make -j$(nproc)`` in a
    customizer) sees the size's CPUs rather than the machine's.
    """
    made = []
    try:
        if cgroup_v2():
            # Controllers reach a child only when each of its parents enables them for its children.
            for parent in (CGROUP_ROOT, CGROUP_ROOT / PARENT):
                parent.mkdir(exist_ok=True)
                (parent / "cgroup.subtree_control").write_text("+cpu +memory +cpuset")
        for controller, group in cgroup_dirs(name).items():
            if controller == "cpuset":
                _inherit_cpuset(group.parent)
            group.mkdir(parents=True, exist_ok=True)
            made.append(group)
            for file, value in _limit_files(controller, limits, group).items():
                (group / file).write_text(value)
    except OSError:
        pass  # a read-only or delegated cgroup tree: the VM runs with whatever limits could be set
    return made


def _limit_files(controller: str, limits: VmLimits, group: Path) -> dict[str, str]:
    period = 100_000
    quota = str(int(limits.cpus * period))
    memory = str(limits.memory_bytes)
    cpus = _cpus_for(group, int(limits.cpus)) if float(limits.cpus).is_integer() else ""
    files = {
        "unified": {"cpu.max": f"{quota} {period}", "memory.max": memory, **({"cpuset.cpus": cpus} if cpus else {})},
        "cpu": {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": quota},
        "memory": {"memory.limit_in_bytes": memory},
        # cgroup v1 cpusets take no process until they have CPUs and memory nodes of their own.
        "cpuset": {
            "cpuset.cpus": cpus or _read(group.parent / "cpuset.cpus"),
            "cpuset.mems": _read(group.parent / "cpuset.mems"),
        },
    }
    return files[controller]


def _inherit_cpuset(parent: Path) -> None:
    """A v1 cpuset folder kiln makes starts empty: give it its parent's CPUs and memory nodes."""
    if not parent.is_dir():
        parent.mkdir()
        for file in ("cpuset.cpus", "cpuset.mems"):
            (parent / file).write_text(_read(parent.parent / file))


def _cpus_for(group: Path, count: int) -> str:
    """``count`` of the CPUs the parent allows, as a cpuset list: consecutive from a start the VM's name picks,
    so that VMs of one vCPU each spread over the machine instead of sharing its first CPU."""
    parent = group.parent
    allowed = (
        _read(parent / "cpuset.cpus") or _read(parent / "cpuset.cpus.effective") or f"0-{(os.cpu_count() or 1) - 1}"
    )
    cpus: list[int] = []
    for part in allowed.split(","):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    start = hashlib.sha256(group.name.encode()).digest()[0] % len(cpus)
    chosen = [cpus[(start + i) % len(cpus)] for i in range(min(max(count, 1), len(cpus)))]
    return ",".join(str(c) for c in sorted(chosen))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def join_command(groups: list[Path]) -> str:
    """Shell lines that move the running shell into ``groups``: a VM's first process runs them first."""
    return "\n".join(f"echo $$ > '{group}/cgroup.procs'" for group in groups)


def processes(name: str) -> set[int]:
    """Every process in the VM's cgroups, and in the cgroups its guest made below them."""
    found: set[int] = set()
    for group in cgroup_dirs(name).values():
        for procs in group.glob("**/cgroup.procs") if group.is_dir() else []:
            found.update(int(pid) for pid in _read(procs).split())
    return found


def kill_all(name: str) -> None:
    """SIGKILL every process of the VM until none is left; a VM whose cgroups are gone is already stopped.

    Raises:
        RuntimeError: processes were still there after ``EMPTY_TIMEOUT_SECONDS``.
    """
    deadline = time.monotonic() + EMPTY_TIMEOUT_SECONDS
    while pids := processes(name):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the processes {sorted(pids)} of VM {name} did not end")
        time.sleep(0.02)


def remove_cgroups(name: str) -> None:
    """Remove the VM's (empty) cgroups, those its guest made below them first; nothing to do when they are gone."""
    for top in cgroup_dirs(name).values():
        below = sorted((p for p in top.glob("**/") if p != top), key=lambda p: len(p.parts), reverse=True)
        for group in [*below, top] if top.is_dir() else []:
            deadline = time.monotonic() + EMPTY_TIMEOUT_SECONDS
            while True:
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    # The last processes may still be leaving the cgroup just after they were killed.
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
