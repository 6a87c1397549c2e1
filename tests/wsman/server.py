"""The WS-Management endpoint of a test Windows machine: WinRM's shell protocol over HTTPS, logged in with NTLM.

It speaks what pywinrm speaks (Create a shell, Command, Receive output in base64 streams with the exit code,
Signal, Delete) and fails as Windows fails: 401 for a login it refuses, SOAP faults with HTTP 500 (an unknown
shell; on command, an injected one), the OperationTimeout fault when a Receive waits longer than the request's
OperationTimeout, and, while its machine restarts, nothing at all: its listening socket closes and every open
connection is cut, and it comes back on the same address and port.

NTLM is real (pyspnego's acceptor, bound to the TLS channel as Windows binds it): a connection is authenticated
once, by the three-request handshake, and its later requests carry no credentials, as with HTTP.sys.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import spnego
from spnego.channel_bindings import GssChannelBindings

from tests.wsman import soap
from tests.wsman.credentials import ListenerCertificate

if TYPE_CHECKING:
    from tests.wsman.machine import Process, WindowsMachine

FaultKind = Literal["timeout", "fault", "http500", "drop", "hang"]


@dataclass
class InjectedFault:
    """The next ``times`` requests of ``action`` (Create, Command, Receive, Signal, Delete) fail this way:
    ``timeout`` the OperationTimeout fault, ``fault`` another SOAP fault, ``http500`` a 500 that is no SOAP,
    ``drop`` the connection closed unanswered, ``hang`` no answer for ``hang_seconds``."""

    action: str
    kind: FaultKind
    times: int = 1
    hang_seconds: float = 5.0
    hits: int = 0


@dataclass
class Shell:
    id: str
    environment: dict[str, str]
    commands: dict[str, Process] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    endpoint: WsmanEndpoint

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a connection cut by a restart, or a client that went away: nothing to report


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes: without this, each answer waits on the client's delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.login: str | None = None
        self._ntlm: spnego.ContextProxy | None = None
        self.server.endpoint._track(self.connection, add=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.endpoint._track(self.connection, add=False)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        endpoint = self.server.endpoint
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        endpoint._count()
        if self.path.rstrip("/") != "/wsman":
            return self._answer(404, b"")
        if self.login is None and not self._authenticate():
            return
        status, payload = endpoint._answer(body)
        if status == 0:  # drop: no answer at all
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._answer(status, payload, "application/soap+xml;charset=UTF-8" if payload else "")

    def _authenticate(self) -> bool:
        """One step of NTLM's handshake; True once this connection's login is accepted."""
        header = self.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("negotiate", "ntlm") or not token:
            self._refuse("Negotiate")
            return False
        if self._ntlm is None:
            bindings = GssChannelBindings(application_data=self.server.endpoint.certificate.channel_binding)
            self._ntlm = spnego.server(protocol="ntlm", channel_bindings=bindings)
        try:
            reply = self._ntlm.step(base64.b64decode(token))
        except spnego.exceptions.SpnegoError:
            self._ntlm = None
            self._refuse(scheme)
            return False
        if not self._ntlm.complete:
            self._refuse(f"{scheme} {base64.b64encode(reply or b'').decode()}")
            return False
        self.login = self._ntlm.client_principal
        return True

    def _refuse(self, challenge: str) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", challenge)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _answer(self, status: int, payload: bytes, content_type: str = "") -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class WsmanEndpoint:
    """The HTTPS listener of one machine on ``host:port``, answering with its ``machine``'s shells.

    ``requests`` counts every HTTP request (NTLM's included: each is a round trip); ``by_action`` counts the
    WS-Management operations.
    """

    def __init__(
        self, machine: WindowsMachine, *, host: str, port: int, certificate: ListenerCertificate, folder: Path
    ) -> None:
        self.machine = machine
        self.host, self.port = host, port
        self.certificate = certificate
        self._context = certificate.server_context(folder)
        self.shells: dict[str, Shell] = {}
        self.faults: list[InjectedFault] = []
        self.requests = 0
        self.request_times: list[float] = []
        self.by_action: Counter[str] = Counter()
        self.started_at: float | None = None
        # Seconds from the listener coming back (after a restart) to the first request it served.
        self.first_request_delays: list[float] = []
        self._awaiting_first = False
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    def inject(self, action: str, kind: FaultKind, *, times: int = 1, hang_seconds: float = 5.0) -> InjectedFault:
        fault = InjectedFault(action=action, kind=kind, times=times, hang_seconds=hang_seconds)
        self.faults.append(fault)
        return fault

    def start(self, *, after_restart: bool = False) -> None:
        server = _Server((self.host, self.port), _Handler)
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        server.endpoint = self
        self._server = server
        self.started_at = time.monotonic()
        self._awaiting_first = after_restart
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        """Go away as a machine that shuts down does: no more connections, and those open are cut."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
            self.shells.clear()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    # ---- called by the handler

    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(connection)

    def _count(self) -> None:
        with self._lock:
            self.requests += 1
            self.request_times.append(time.time())
            if self._awaiting_first and self.started_at is not None:
                self.first_request_delays.append(time.monotonic() - self.started_at)
                self._awaiting_first = False

    def _answer(self, body: bytes) -> tuple[int, bytes]:
        """The HTTP status and body for one SOAP request; status 0 means drop the connection unanswered."""
        try:
            request = soap.parse(body)
        except Exception as err:  # not WS-Management at all
            return 500, soap.fault(
                None, code="Sender", subcode="SchemaValidationError", reason=str(err), wsman_code=soap.SCHEMA_VALIDATION
            )
        action = request.action.rsplit("/", 1)[-1]
        self.by_action[action] += 1
        injected = self._injected(action)
        if injected is not None:
            return self._fail(request, injected)
        handler = {
            "Create": self._create,
            "Command": self._command,
            "Receive": self._receive,
            "Signal": self._signal,
            "Delete": self._delete,
            "Send": lambda r: (200, soap.envelope(r, "<rsp:SendResponse/>")),
        }.get(action)
        if handler is None:
            return 500, soap.fault(
                request,
                code="Sender",
                subcode="ActionNotSupported",
                reason=f"unknown action {request.action}",
                wsman_code=soap.SCHEMA_VALIDATION,
            )
        return handler(request)

    def _injected(self, action: str) -> InjectedFault | None:
        with self._lock:
            for fault in self.faults:
                if fault.action == action and fault.hits < fault.times:
                    fault.hits += 1
                    return fault
        return None

    def _fail(self, request: soap.SoapRequest, fault: InjectedFault) -> tuple[int, bytes]:
        if fault.kind == "timeout":
            return 500, self._timed_out(request)
        if fault.kind == "fault":
            return 500, soap.fault(
                request,
                code="Receiver",
                subcode="InternalError",
                reason="The WS-Management service cannot process the request. (injected)",
                wsman_code=2150858770,
            )
        if fault.kind == "http500":
            return 500, b"internal server error"
        if fault.kind == "hang":
            time.sleep(fault.hang_seconds)
        return 0, b""

    def _timed_out(self, request: soap.SoapRequest) -> bytes:
        return soap.fault(
            request,
            code="Receiver",
            subcode="TimedOut",
            reason="The WS-Management service cannot complete the operation within the time specified in OperationTimeout.",
            wsman_code=soap.OPERATION_TIMED_OUT,
        )

    def _shell(self, request: soap.SoapRequest) -> Shell | None:
        with self._lock:
            return self.shells.get(request.shell_id or "")

    def _no_shell(self, request: soap.SoapRequest) -> tuple[int, bytes]:
        return 500, soap.fault(
            request,
            code="Sender",
            subcode="InvalidSelectors",
            reason="The WS-Management service cannot process the request because the request contained invalid selectors for the resource.",
            wsman_code=soap.INVALID_SELECTORS,
        )

    def _create(self, request: soap.SoapRequest) -> tuple[int, bytes]:
        shell = Shell(id=str(uuid.uuid4()).upper(), environment=request.environment)
        with self._lock:
            self.shells[shell.id] = shell
        return 200, soap.shell_created(request, shell.id)

    def _command(self, request: soap.SoapRequest) -> tuple[int, bytes]:
        shell = self._shell(request)
        if shell is None:
            return self._no_shell(request)
        line = " ".join([request.command, *request.arguments]).strip()
        command_id = str(uuid.uuid4()).upper()
        shell.commands[command_id] = self.machine.start_command(line, shell.environment)
        return 200, soap.command_started(request, command_id)

    def _receive(self, request: soap.SoapRequest) -> tuple[int, bytes]:
        shell = self._shell(request)
        process = shell.commands.get(request.command_id or "") if shell is not None else None
        if process is None:
            return self._no_shell(request)
        got = process.receive(timeout=request.operation_timeout)
        if got is None:
            return 500, self._timed_out(request)
        chunks, exit_code = got
        return 200, soap.received(request, request.command_id or "", chunks, exit_code)

    def _signal(self, request: soap.SoapRequest) -> tuple[int, bytes]:
        shell = self._shell(request)
        if shell is None:
            return self._no_shell(request)
        process = shell.commands.pop(request.command_id or "", None)
        if process is not None and request.signal.endswith("/terminate"):
            process.terminate()
        return 200, soap.envelope(request, "<rsp:SignalResponse/>")

    def _delete(self, request: soap.SoapRequest) -> tuple[int, bytes]:
        with self._lock:
            shell = self.shells.pop(request.shell_id or "", None)
        if shell is None:
            return self._no_shell(request)
        return 200, soap.envelope(request, "")
