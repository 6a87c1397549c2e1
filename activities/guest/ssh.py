"""A ``GuestSession`` over SSH (asyncssh), for any Linux VM kiln can reach: a local build VM or an Azure one.

Scripts run detached in the guest (``setsid``), writing their output and then their exit code to files under
``/var/lib/kiln-guest/runs/<run id>/``. So a dropped connection or a dead worker does not end a script, and
whoever connects next reads on from any offset. The run files belong to root but are readable by everyone:
the deprovision step deletes the very user the session logged in as, and the open session must still be able
to read how it ended. A worker that takes over a deprovision cannot log in again (the user and the host keys
are gone): it reads the same run files through the cloud's own way into the VM, a ``ShellSession`` as root.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncssh

from activities.clouds.base import PermanentError
from activities.guest.base import ScriptProgress

GUEST_DIR = "/var/lib/kiln-guest"
RUNS_DIR = f"{GUEST_DIR}/runs"
# How long a refused connection is retried: the guest's sshd may still be starting.
CONNECT_RETRY_SECONDS = 20.0
POLL_CHUNK_BYTES = 1 << 20
# Every command kiln runs over a session is short (start, poll, stop a script). One that has not answered in this
# long is stuck, not slow: the guest froze or the connection died without a word. Failing it lets the step's
# retry re-attach; waiting on it would keep a build Running while the heartbeat says all is well.
COMMAND_TIMEOUT_SECONDS = 120.0
# A connection whose peer went away silently is found within about a minute.
KEEPALIVE_SECONDS = 15
KEEPALIVE_COUNT_MAX = 4
KILL_GRACE_SECONDS = 5

# Claims the run (mkdir is atomic, so a second start is a no-op) only once the whole script has arrived, and
# starts it in a session of its own. $1 run dir, $2 expected script size, $3 user to run as ("" for root), then
# NAME=value pairs for its environment. The script runs as a file, as Packer's `chmod +x; {{.Vars}} {{.Path}}`
# runs it: env execs it by its #! line, and a file without one is run by /bin/sh (execvp's ENOEXEC rule).
_START = r"""
set -eu
dir=$1
mkdir -p -m 0755 "${dir%/*}"
incoming="${dir%/*}/.incoming-$$"
cat > "$incoming"
if [ "$(wc -c < "$incoming")" -ne "$2" ]; then rm -f "$incoming"; echo "script arrived incomplete" >&2; exit 2; fi
if ! mkdir -m 0755 "$dir" 2>/dev/null; then rm -f "$incoming"; exit 0; fi
chmod 0755 "$incoming"
mv "$incoming" "$dir/script"
: > "$dir/output"
user=$3
shift 3
setsid -f sh -c '
  dir=$1 user=$2
  shift 2
  echo $$ > "$dir/pid.tmp" && mv "$dir/pid.tmp" "$dir/pid"
  trap : TERM  # kill_script stops the process group: outlive the script long enough to record its end
  if [ -n "$user" ]; then
    runuser -u "$user" -- sh -c "cd 2>/dev/null || cd /; exec env \"\$@\"" sh "$@" "$dir/script" > "$dir/output" 2>&1 < /dev/null
  else
    (cd /root 2>/dev/null || cd /; exec env "$@" "$dir/script") > "$dir/output" 2>&1 < /dev/null
  fi
  echo $? > "$dir/exit.tmp" && mv "$dir/exit.tmp" "$dir/exit"
' sh "$dir" "$user" "$@" > /dev/null 2>&1 < /dev/null
# Return once the run has its pid file, so a kill_script right after this always finds the process group.
waited=0
until [ -e "$dir/pid" ]; do
  [ "$waited" -lt 500 ] || { echo "the script did not start" >&2; exit 2; }
  sleep 0.01
  waited=$((waited + 1))
done
"""

# Reads the exit code before the output: once the exit file is there the output file is complete, so reading
# in this order never reports an end while output is still unread.
_POLL = r"""
dir=$1
[ -d "$dir" ] || { echo missing; exit 0; }
code=$(cat "$dir/exit" 2>/dev/null || true)
echo "${code:--}"
tail -c "+$(($2 + 1))" "$dir/output" | head -c "$3"
"""

_KILL = r"""
dir=$1
[ -f "$dir/exit" ] && exit 0
[ -f "$dir/pid" ] || exit 0  # never started
group=$(cat "$dir/pid")
# env: dash's own kill cannot signal a process group.
env kill -TERM -- "-$group" 2>/dev/null || exit 0
waited=0
while env kill -0 -- "-$group" 2>/dev/null; do
  if [ "$waited" -ge "$(($2 * 10))" ]; then env kill -KILL -- "-$group" 2>/dev/null; sleep 0.1; break; fi
  sleep 0.1
  waited=$((waited + 1))
done
[ -f "$dir/exit" ] || { echo 137 > "$dir/exit.tmp" && mv "$dir/exit.tmp" "$dir/exit"; }
"""

_SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def run_dir(run_id: str) -> str:
    """The guest folder of one run; a run id that is not a plain file name is hashed into one."""
    if not _SAFE_RUN_ID.fullmatch(run_id):
        run_id = hashlib.sha256(run_id.encode()).hexdigest()[:32]
    return f"{RUNS_DIR}/{run_id}"


@dataclass(frozen=True)
class Completed:
    """How one shell command in the guest ended."""

    exit_status: int
    stdout: bytes
    stderr: bytes


class ShellSession:
    """``GuestSession`` for a Linux guest, over any way of running one shell command in it: an SSH login as
    the admin user (root work through sudo), or the cloud's own way in as root (``username`` root), which a
    deprovision that deleted the admin user and the host keys leaves working."""

    # Output bytes one poll reads.
    poll_chunk_bytes = POLL_CHUNK_BYTES

    def __init__(self, username: str) -> None:
        self._username = username

    async def command(self, command: str, *, stdin: bytes | None) -> Completed:
        """Run ``command`` (a line for ``sh -c``) in the guest as ``username``."""
        raise NotImplementedError

    async def upload(self, data: bytes, destination: str, *, mode: int = 0o644) -> None:
        script = 'cat > "$1" && chmod "$2" "$1"'
        result = await self._run(script, destination, f"{mode:o}", stdin=data, as_root=True)
        if result.exit_status != 0:
            raise RuntimeError(f"could not write {destination} in the guest: {_text(result.stderr)}")

    async def path_exists(self, path: str) -> bool:
        return (await self._run('test -e "$1"', path)).exit_status == 0

    async def start_script(
        self,
        run_id: str,
        script: str,
        *,
        as_root: bool = False,
        as_system: bool = False,
        environment: dict[str, str] | None = None,
    ) -> None:
        data = script.encode()
        run_as = "" if as_root or as_system or self._username == "root" else self._username
        variables = [f"{name}={value}" for name, value in (environment or {}).items()]
        result = await self._run(_START, run_dir(run_id), str(len(data)), run_as, *variables, stdin=data, as_root=True)
        if result.exit_status != 0:
            raise RuntimeError(f"could not start {run_id} in the guest: {_text(result.stderr)}")

    async def poll_script(self, run_id: str, offset: int) -> ScriptProgress:
        result = await self._run(_POLL, run_dir(run_id), str(offset), str(self.poll_chunk_bytes))
        if result.exit_status != 0:
            raise RuntimeError(f"could not read {run_id} in the guest: {_text(result.stderr)}")
        status, _, output = result.stdout.partition(b"\n")
        if status == b"missing":
            raise PermanentError(f"the guest has no script run {run_id}: it was never started there", kind="ScriptLost")
        # A full chunk may not be the end of the output: report the exit code only once all of it is read.
        ended = status != b"-" and len(output) < self.poll_chunk_bytes
        return ScriptProgress(output=output, exit_code=int(status) if ended else None)

    async def kill_script(self, run_id: str) -> None:
        result = await self._run(_KILL, run_dir(run_id), str(KILL_GRACE_SECONDS), as_root=True)
        if result.exit_status != 0:
            raise RuntimeError(f"could not stop {run_id} in the guest: {_text(result.stderr)}")

    async def _run(self, script: str, *args: str, stdin: bytes | None = None, as_root: bool = False) -> Completed:
        command = " ".join(["sh", "-c", shlex.quote(script), "sh", *map(shlex.quote, args)])
        if as_root and self._username != "root":
            command = f"sudo -n {command}"
        return await self.command(command, stdin=stdin)


class SshSession(ShellSession):
    """``GuestSession`` on one asyncssh connection, logged in as ``username``."""

    def __init__(self, connection: asyncssh.SSHClientConnection, username: str) -> None:
        super().__init__(username)
        self._connection = connection

    async def command(self, command: str, *, stdin: bytes | None) -> Completed:
        try:
            # Around the whole call: a frozen sshd never answers the channel open, which run's own timeout omits.
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                result = await self._connection.run(command, input=stdin, encoding=None, check=False)
        except TimeoutError:
            raise RuntimeError(
                f"the guest did not answer a command within {COMMAND_TIMEOUT_SECONDS:g} s (frozen, or its connection "
                "died); the step's retry connects again and re-attaches to its script"
            ) from None
        status = -1 if result.exit_status is None else result.exit_status  # None: ended by a signal
        return Completed(status, bytes(result.stdout or b""), bytes(result.stderr or b""))

    async def upload(self, data: bytes, destination: str, *, mode: int = 0o644) -> None:
        async with self._connection.start_sftp_client() as sftp:
            async with sftp.open(destination, "wb") as remote:
                await remote.write(data)
            await sftp.chmod(destination, mode)


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        data = data.decode(errors="replace")
    return (data or "").strip()


@asynccontextmanager
async def open_session(
    *,
    host: str,
    port: int,
    username: str,
    host_key: str,
    client_key: asyncssh.SSHKey,
    retry_seconds: float = CONNECT_RETRY_SECONDS,
) -> AsyncIterator[SshSession]:
    """Log in with ``client_key``, accepting only ``host_key`` (an ``ssh-ed25519 AAAA...`` line) from the
    server: the key is known before the VM boots, so nothing is ever trusted on first use."""
    trusted = ([asyncssh.import_public_key(host_key)], [], [])
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            connection = await asyncssh.connect(
                host,
                port,
                username=username,
                client_keys=[client_key],
                known_hosts=trusted,
                agent_path=None,
                config=None,
                connect_timeout=30,
                keepalive_interval=KEEPALIVE_SECONDS,
                keepalive_count_max=KEEPALIVE_COUNT_MAX,
            )
            break
        except asyncssh.HostKeyNotVerifiable as err:
            raise PermanentError(
                f"{host}:{port} presented a host key other than the one pinned for it: {err.reason}",
                kind="HostKeyMismatch",
            ) from err
        except asyncssh.PermissionDenied as err:
            raise PermanentError(
                f"{host}:{port} refused the login of {username}: {err.reason}", kind="LoginRefused"
            ) from err
        except (ConnectionRefusedError, asyncssh.ConnectionLost):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    try:
        yield SshSession(connection, username)
    finally:
        connection.close()
        await connection.wait_closed()
