"""A WinRM client on pywinrm: one command at a time, each in a shell of its own, each within its own deadline.

Not pywinrm's ``Session.run_cmd``: that leaks the remote shell when a command fails half-way, and its receive
loop re-polls forever on WS-Management operation timeouts, so a guest that stops answering mid-command (a
reboot) would hold a step until its activity timed out. Here every command opens a shell and closes it, also
when the command failed (as long as the guest still answers), polls for output until its own deadline, and any
failure to get an answer raises ``WinRmError``: a transport error is never mistaken for a command that ran and
failed, which is a ``CommandResult`` with its exit code.

The connection is WinRM over HTTPS with NTLM, as Azure's Windows images accept it. The listener's certificate is
self-signed in the guest, so no CA vouches for it: it is pinned by its SHA-1 thumbprint (Windows' own name for a
certificate), and checked on every TLS handshake.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from winrm.exceptions import (
    InvalidCredentialsError,
    WinRMError,
    WinRMOperationTimeoutError,
    WinRMTransportError,
    WSManFaultError,
)
from winrm.protocol import Protocol

from activities.clouds.base import PermanentError

# cmd.exe refuses longer command lines ("The command line is too long."); a script is uploaded instead.
MAX_COMMAND_LINE = 8191
POWERSHELL = "powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass"


@dataclass(frozen=True)
class WinRmSettings:
    """How long the parts of one command may take, in seconds.

    ``operation_timeout`` is how long the guest may hold one Receive open while a command prints nothing (sent as
    WS-Management's OperationTimeout; pywinrm's default is 20); ``read_timeout`` is how long one HTTP answer may
    take, so it must exceed ``operation_timeout``; ``command_timeout`` bounds a whole command. kiln's commands are
    short by design (a step's script runs detached), so a command that outlasts it means a guest that stopped
    answering.
    """

    operation_timeout: int = 20
    read_timeout: int = 30
    command_timeout: float = 120.0


@dataclass(frozen=True)
class CommandResult:
    """A command that ran to its end in the guest."""

    stdout: bytes
    stderr: bytes
    exit_code: int

    @property
    def text(self) -> str:
        """Both streams as text, for messages and for commands whose output kiln reads."""
        return (self.stdout + self.stderr).decode(errors="replace")


class WinRmError(Exception):
    """No usable answer from the guest's WinRM service; the command may or may not have run."""


class GuestUnreachable(WinRmError):
    """The guest did not answer: connection refused or reset, a TLS or HTTP failure, a read timeout. A guest that
    is restarting looks like this."""


class CommandTimedOut(GuestUnreachable):
    """The guest accepted the command but did not finish it within the command's deadline."""


class WinRmFault(WinRmError):
    """The WS-Management service answered with a SOAP fault (an unknown shell, a quota, a bad request)."""


class _PinnedCertificate(HTTPAdapter):
    """Accepts only the server certificate whose SHA-1 fingerprint is ``thumbprint``, whoever signed it."""

    def __init__(self, thumbprint: str) -> None:
        self._thumbprint = thumbprint
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["assert_fingerprint"] = self._thumbprint
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]


def encode_powershell(script: str) -> str:
    """The command line that runs ``script`` in PowerShell (base64 UTF-16LE, as ``-EncodedCommand`` takes it)."""
    encoded = base64.b64encode(("$ProgressPreference = 'SilentlyContinue'\n" + script).encode("utf-16-le"))
    return f"{POWERSHELL} -EncodedCommand {encoded.decode()}"


def ps_quote(value: str) -> str:
    """``value`` as a single-quoted PowerShell string, which expands nothing."""
    return "'" + value.replace("'", "''") + "'"


class WinRmClient:
    """Runs commands in one guest over WinRM/HTTPS, as ``username``.

    Args:
        thumbprint: the pinned listener certificate's SHA-1 fingerprint (hex); None accepts any certificate,
            which only a user's explicit choice allows (see ``WinRmTransport``).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        thumbprint: str | None,
        settings: WinRmSettings | None = None,
    ) -> None:
        self.settings = settings or WinRmSettings()
        self.address = f"{host}:{port}"
        self._protocol = Protocol(
            f"https://{host}:{port}/wsman",
            transport="ntlm",
            username=username,
            password=password,
            # The certificate is checked by its pin below, not against a CA: kiln made it self-signed.
            server_cert_validation="ignore",
            operation_timeout_sec=self.settings.operation_timeout,
            read_timeout_sec=self.settings.read_timeout,
            proxy=None,
        )
        session = self._protocol.transport.build_session()
        if thumbprint is not None:
            session.mount("https://", _PinnedCertificate(thumbprint))
        # One command at a time: pywinrm's protocol object and its HTTP session are not shared between threads.
        self._lock = asyncio.Lock()

    async def run(
        self, command: str, *, env: dict[str, str] | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run one command line (through cmd.exe, as WinRM does) and wait for its end.

        Args:
            env: environment variables of the command's shell: how a secret reaches a command without being
                written into its command line.
            timeout: this command's deadline in seconds, instead of the settings' ``command_timeout``.

        Raises:
            WinRmError: no usable answer (the command may have started); ``CommandTimedOut`` past its deadline.
            PermanentError: ``LoginRefused`` (the credentials were rejected) or ``HostKeyMismatch`` (the listener
                presented another certificate than the pinned one).
        """
        async with self._lock:
            return await asyncio.to_thread(self._run, command, env or {}, timeout or self.settings.command_timeout)

    async def run_powershell(
        self, script: str, *, env: dict[str, str] | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run a short PowerShell script as an encoded command line (longer scripts are uploaded and run as files).

        Raises:
            ValueError: the encoded script would not fit cmd.exe's command line.
        """
        command = encode_powershell(script)
        if len(command) > MAX_COMMAND_LINE:
            raise ValueError(f"a PowerShell command of {len(script)} characters does not fit cmd.exe's command line")
        return await self.run(command, env=env, timeout=timeout)

    def close(self) -> None:
        """Drop the HTTP connection (and with it the NTLM-authenticated channel)."""
        self._protocol.transport.close_session()

    def _run(self, command: str, env: dict[str, str], timeout: float) -> CommandResult:
        deadline = time.monotonic() + timeout
        protocol = self._protocol
        with _answers(self.address):
            shell_id = protocol.open_shell(env_vars=env or None, codepage=65001)
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        command_id: str | None = None
        reachable = True
        try:
            with _answers(self.address):
                command_id = protocol.run_command(shell_id, command)
                while True:
                    try:
                        out, err, exit_code, done = protocol.get_command_output_raw(shell_id, command_id)
                    except WinRMOperationTimeoutError:
                        # The command still runs and printed nothing for a whole OperationTimeout: ask again, but
                        # only until this command's own deadline.
                        out, err, exit_code, done = b"", b"", -1, False
                    stdout.append(out)
                    stderr.append(err)
                    if done:
                        return CommandResult(b"".join(stdout), b"".join(stderr), exit_code)
                    if time.monotonic() > deadline:
                        raise CommandTimedOut(f"{self.address}: a command did not finish within {timeout:g} s")
        except GuestUnreachable as err:
            reachable = isinstance(err, CommandTimedOut)
            raise
        finally:
            if reachable:  # a guest that no longer answers has dropped its shells anyway
                self._close(shell_id, command_id)

    def _close(self, shell_id: str, command_id: str | None) -> None:
        """Stop the command and delete its shell; failing to is not the command's failure."""
        try:
            if command_id is not None:
                self._protocol.cleanup_command(shell_id, command_id)
            self._protocol.close_shell(shell_id, close_session=False)
        except (WinRMError, WinRMTransportError, WinRMOperationTimeoutError, requests.RequestException):
            pass


@contextmanager
def _answers(address: str) -> Iterator[None]:
    """Turns pywinrm's and requests' exceptions into kiln's: transport, fault, or a refusal no retry fixes."""
    try:
        yield
    except InvalidCredentialsError as err:
        raise PermanentError(f"{address} refused the build admin's WinRM login: {err}", kind="LoginRefused") from err
    except requests.exceptions.SSLError as err:
        if "Fingerprints did not match" in str(err):
            raise PermanentError(
                f"{address} presented a WinRM certificate other than the one pinned for it: {err}",
                kind="HostKeyMismatch",
            ) from err
        raise GuestUnreachable(f"{address}: TLS failed: {err}") from err
    except WSManFaultError as err:
        raise WinRmFault(
            f"{address}: WS-Management fault {err.fault_subcode or err.fault_code} ({err.wsman_fault_code}): "
            f"{err.reason}"
        ) from err
    except (requests.RequestException, WinRMTransportError, WinRMOperationTimeoutError) as err:
        raise GuestUnreachable(f"{address} did not answer: {err}") from err
    except WinRMError as err:
        raise WinRmFault(f"{address}: {err}") from err
