"""Host commands, file locks and what a dead worker's commands leave, shared by the local cloud's images, VMs and
captures."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TypeVar

from activities.clouds.base import PermanentError

T = TypeVar("T")

LOCK_POLL_SECONDS = 0.05


class CommandFailed(RuntimeError):
    def __init__(self, argv: tuple[str, ...], returncode: int, stderr: bytes) -> None:
        self.returncode = returncode
        self.stderr = stderr.decode(errors="replace").strip()
        super().__init__(f"{' '.join(argv)} exited with {returncode}: {self.stderr[-2000:]}")


async def run(*argv: str, input: bytes | None = None, check: bool = True) -> bytes:
    """Run a host command and return its stdout; raise ``CommandFailed`` with its stderr when it fails."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate(input)
    if check and process.returncode != 0:
        raise CommandFailed(argv, process.returncode or 0, stderr)
    return stdout


def require_programs(programs: dict[str, str], *, needed_by: str) -> None:
    """Fail at once, naming each one, when a host program ``needed_by`` runs is missing (``{program: package}``).

    A retry cannot install a program, and without this check the failure surfaces late and vague (a VM that
    never answers SSH).
    """
    missing = [
        f"{program} (Debian package {package})" for program, package in programs.items() if not shutil.which(program)
    ]
    if missing:
        raise PermanentError(
            f"{needed_by} needs {', '.join(missing)}, missing on this machine: run deploy/setup-debian.sh",
            kind="HostProgramMissing",
        )


async def ssh_answers(address: str, port: int) -> bool:
    """True once an SSH server accepts a connection at ``address:port`` and sends its banner (a port forward
    accepts at once, with or without an sshd behind it, so the banner is what counts)."""
    try:
        reader, writer = await asyncio.open_connection(address, port)
    except OSError:
        return False
    try:
        banner = await asyncio.wait_for(reader.readline(), timeout=2)
        return banner.startswith(b"SSH-")
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()


@asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[None]:
    """Hold an exclusive lock on ``path`` across processes (every worker on the machine shares the state folder).

    Polls with a non-blocking lock rather than blocking in a thread, so a cancelled waiter leaves nothing
    behind that could take the lock later. The kernel drops the lock if the holder dies. The holder may unlink
    ``path`` when what it guards is gone: a waiter that then gets the lock on the unlinked file starts over.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_SECONDS)
            try:
                still_there = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                still_there = False
            if still_there:
                yield
                return
        finally:
            os.close(fd)


async def to_the_end(work: Awaitable[T]) -> T:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (a build cancelled, a worker handing its
    step over); the cancel is raised once it has ended. A VM half launched when its lock is let go could be
    launched a second time by the attempt that takes over."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with suppress(Exception):
            await task
        raise


def end_what_runs_in(folder: Path) -> None:
    """End every process working in ``folder`` (named on its command line, or chrooted inside it), with the process
    group it leads, and unmount whatever is mounted inside it, deepest first: what a worker that died during a long
    command there (mmdebstrap making a base) left behind, which would otherwise race the retry's own. Done when
    nothing of it is left."""
    inside = f"{folder}/"
    found: dict[int, int] = {}  # pid: its process group
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            command = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace")
            root = os.readlink(f"/proc/{entry.name}/root")
            if str(folder) in command or root.startswith(inside):
                found[int(entry.name)] = os.getpgid(int(entry.name))
    # A group is ended whole only when its leader is one of them (mmdebstrap runs in a session of its own).
    groups = {group for group in found.values() if group in found}
    for group in groups:
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for pid, group in found.items():
        if group not in groups:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_group_alive(group) for group in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(inside)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
