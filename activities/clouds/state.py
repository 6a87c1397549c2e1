"""Where kiln keeps its state on this machine, and the worker secret both clouds derive build VM keys from."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def state_dir() -> Path:
    """kiln's state folder: ``$KILN_HOME``, else ``/var/lib/kiln`` for root, else ``~/.local/state/kiln``."""
    if home := os.environ.get("KILN_HOME"):
        path = Path(home)
    elif os.geteuid() == 0:
        path = Path("/var/lib/kiln")
    else:
        path = Path.home() / ".local" / "state" / "kiln"
    path.mkdir(parents=True, exist_ok=True)
    return path


def worker_secret() -> bytes:
    """A secret shared by the workers on this machine. Per-build VM keys are derived from it and the build id,
    so a worker that takes over a build after a crash can log in to the VM the first worker made, and no key
    ever passes through workflow history."""
    path = state_dir() / "worker.secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(secrets.token_bytes(32))
    tmp.chmod(0o600)
    try:
        os.link(tmp, path)  # first writer wins; others read what it wrote
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()
