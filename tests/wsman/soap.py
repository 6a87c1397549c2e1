"""WS-Management's SOAP vocabulary, as far as a WinRM shell client uses it: reading requests, writing answers.

Requests are read by namespace (clients choose their own prefixes); answers are written the way Windows writes
them (``s:`` for the envelope), each relating to the request's MessageID.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "p": "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
    "x": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
}
SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
CMD_RESOURCE = f"{SHELL}/cmd"
CREATE, DELETE = f"{TRANSFER}/Create", f"{TRANSFER}/Delete"
COMMAND, RECEIVE, SIGNAL, SEND = f"{SHELL}/Command", f"{SHELL}/Receive", f"{SHELL}/Signal", f"{SHELL}/Send"
DONE, RUNNING = f"{SHELL}/CommandState/Done", f"{SHELL}/CommandState/Running"
# WSManFault codes Windows answers with.
OPERATION_TIMED_OUT = 2150858793  # 0x80338029: nothing happened within the request's OperationTimeout
INVALID_SELECTORS = 2150858843  # 0x8033805B: no such shell
SCHEMA_VALIDATION = 2150858817


@dataclass
class SoapRequest:
    """What one WS-Management request asks for."""

    action: str
    message_id: str
    resource_uri: str
    operation_timeout: float
    shell_id: str | None = None
    command: str = ""
    arguments: list[str] = field(default_factory=list)
    command_id: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    signal: str = ""


def _duration(text: str | None) -> float:
    found = re.fullmatch(r"PT(\d+(?:\.\d+)?)S", (text or "").strip())
    return float(found.group(1)) if found else 60.0


def parse(body: bytes) -> SoapRequest:
    """Read a request.

    Raises:
        ValueError: the body is not a WS-Management request.
    """
    root = ET.fromstring(body)
    header = root.find("s:Header", NS)
    if header is None:
        raise ValueError("no SOAP header")

    def text(path: str, node: ET.Element = header) -> str:
        found = node.find(path, NS)
        return (found.text or "").strip() if found is not None else ""

    request = SoapRequest(
        action=text("a:Action"),
        message_id=text("a:MessageID"),
        resource_uri=text("w:ResourceURI"),
        operation_timeout=_duration(text("w:OperationTimeout")),
    )
    shell = header.find("w:SelectorSet/w:Selector[@Name='ShellId']", NS)
    request.shell_id = (shell.text or "").strip() if shell is not None else None
    body_node = root.find("s:Body", NS)
    if body_node is None:
        return request
    for variable in body_node.findall("rsp:Shell/rsp:Environment/rsp:Variable", NS):
        request.environment[variable.get("Name", "")] = variable.text or ""
    request.command = text("rsp:CommandLine/rsp:Command", body_node)
    request.arguments = [a.text or "" for a in body_node.findall("rsp:CommandLine/rsp:Arguments", NS)]
    for path in ("rsp:Receive/rsp:DesiredStream", "rsp:Signal", "rsp:Send/rsp:Stream"):
        node = body_node.find(path, NS)
        if node is not None:
            request.command_id = node.get("CommandId")
    request.signal = text("rsp:Signal/rsp:Code", body_node)
    return request


def envelope(request: SoapRequest, body: str) -> bytes:
    """An answer to ``request``: its action's response, related to its MessageID."""
    return (
        '<s:Envelope xml:lang="en-US" xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
        'xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" '
        'xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd" '
        'xmlns:rsp="http://schemas.microsoft.com/wbem/wsman/1/windows/shell" '
        'xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer"><s:Header>'
        f"<a:Action>{escape(request.action)}Response</a:Action>"
        f"<a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
        "<a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:To>"
        f"<a:RelatesTo>{escape(request.message_id)}</a:RelatesTo>"
        f"</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def fault(request: SoapRequest | None, *, code: str, subcode: str, reason: str, wsman_code: int) -> bytes:
    """A SOAP fault, as Windows sends one with HTTP 500."""
    relates = request.message_id if request is not None else f"uuid:{uuid.uuid4()}"
    body = (
        f"<s:Fault><s:Code><s:Value>s:{code}</s:Value><s:Subcode><s:Value>w:{subcode}</s:Value></s:Subcode>"
        f'</s:Code><s:Reason><s:Text xml:lang="en-US">{escape(reason)}</s:Text></s:Reason><s:Detail>'
        f'<f:WSManFault xmlns:f="http://schemas.microsoft.com/wbem/wsman/1/wsmanfault" Code="{wsman_code}" '
        f'Machine="windows"><f:Message>{escape(reason)}</f:Message></f:WSManFault></s:Detail></s:Fault>'
    )
    action = request.action if request is not None else "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault"
    return envelope(SoapRequest(action=action, message_id=relates, resource_uri="", operation_timeout=0), body)


def shell_created(request: SoapRequest, shell_id: str) -> bytes:
    return envelope(
        request,
        "<x:ResourceCreated><a:Address>http://windows/wsman</a:Address><a:ReferenceParameters>"
        f"<w:ResourceURI>{CMD_RESOURCE}</w:ResourceURI><w:SelectorSet>"
        f'<w:Selector Name="ShellId">{shell_id}</w:Selector></w:SelectorSet>'
        "</a:ReferenceParameters></x:ResourceCreated>",
    )


def command_started(request: SoapRequest, command_id: str) -> bytes:
    return envelope(request, f"<rsp:CommandResponse><rsp:CommandId>{command_id}</rsp:CommandId></rsp:CommandResponse>")


def received(request: SoapRequest, command_id: str, chunks: list[tuple[str, str]], exit_code: int | None) -> bytes:
    """Output since the last Receive (``(stream, base64)`` pairs), and the command's state."""
    streams = "".join(
        f'<rsp:Stream Name="{name}" CommandId="{command_id}">{data}</rsp:Stream>' for name, data in chunks
    )
    if exit_code is None:
        state = f'<rsp:CommandState CommandId="{command_id}" State="{RUNNING}"/>'
    else:
        streams += "".join(
            f'<rsp:Stream Name="{name}" CommandId="{command_id}" End="true"/>' for name in ("stdout", "stderr")
        )
        state = (
            f'<rsp:CommandState CommandId="{command_id}" State="{DONE}">'
            f"<rsp:ExitCode>{exit_code}</rsp:ExitCode></rsp:CommandState>"
        )
    return envelope(request, f"<rsp:ReceiveResponse>{streams}{state}</rsp:ReceiveResponse>")
