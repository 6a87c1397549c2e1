"""Recorded ARM traffic, and the diff of a recording made on real Azure against one made on the ARM emulator.

The ARM emulator was written from the same understanding as kiln's Azure code, so the two can share a wrong
belief. A recording of what real Azure answered to a build, set beside the emulator's answers to the same build,
shows where they part. ``Recorder`` is an azure-core pipeline policy that writes every ARM exchange (each retry
too) to a JSON-lines file: method, URL, status, the headers the long-running-operation and retry protocols use,
and both bodies, with secrets and SAS signatures removed.

    python -m tests.azure_live.recording diff live.jsonl emulated.jsonl

compares, per call (method and URL with names, ids and regions replaced by placeholders): the status codes, the
protocol headers present, the shape of the response bodies (their key paths), and the provisioningState sequence of
each resource and the status sequence of each operation. It prints each divergence and exits 1 if there are any.
How the two recordings are made: README.md, "Tests".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import AsyncHTTPPolicy

# The headers of ARM's long-running-operation and retry protocols: what a client acts on.
PROTOCOL_HEADERS = ("azure-asyncoperation", "location", "retry-after", "retry-after-ms", "x-ms-retry-after-ms")
_SECRET_KEYS = {"adminpassword", "customdata", "accesssas", "securitydataaccesssas", "securitymetadataaccesssas"}
_SIGNATURE = re.compile(r"([?&](?:sig|se|st|skoid|sktid|skt|ske|sks|skv|sv|sp|sr|spr|si)=)[^&\"]*")


def redact(value: Any) -> Any:
    """The body with secrets and SAS signatures blanked; its shape is kept."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if k.lower() in _SECRET_KEYS else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _SIGNATURE.sub(r"\1<redacted>", value)
    return value


def _json(text: str | bytes | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return "<not json>"


class Recorder(AsyncHTTPPolicy):
    """Appends every exchange that passes through it to ``path`` (JSON lines). Give it to an async management
    client as one of its ``per_retry_policies``, so each retry is recorded as the exchange it is. It reads each
    answer's body before the client does: the SDK streams the first answer of a long-running operation, and that
    body (a resource in its first provisioningState) is one of the things compared."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    async def send(self, request: PipelineRequest) -> PipelineResponse:
        response = await self.next.send(request)
        empty = response.http_response.headers.get("Content-Length") == "0"
        if not empty:
            # Kept by the response: the client reads the same bytes. (An empty body read twice raises in
            # azure-core's aiohttp response, so it is left alone.)
            await response.http_response.read()
        self._record(request, response, None if empty else response.http_response.text())
        return response

    def _record(self, request: PipelineRequest, response: PipelineResponse, text: str | None) -> None:
        sent, answer = request.http_request, response.http_response
        body = getattr(sent, "content", None)
        headers = {k.lower(): v for k, v in answer.headers.items()}
        record = {
            "method": sent.method,
            "url": _SIGNATURE.sub(r"\1<redacted>", sent.url),
            "request": redact(_json(body if isinstance(body, str | bytes) else None)),
            "status": answer.status_code,
            "headers": {name: headers[name] for name in PROTOCOL_HEADERS if name in headers},
            "response": redact(_json(text)),
        }
        with self._lock, self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- normalising

_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_NAMED = {"subscriptions", "resourcegroups", "locations", "operations", "operationresults", "asyncoperations"}


def template_of(url: str) -> str:
    """A call's URL with what differs between two runs of one build replaced: subscription, group, resource and
    operation names, regions, versions. What stays: the path's structure and the query's names and api-version."""
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    out: list[str] = []
    after_providers = 0
    for i, seg in enumerate(segments):
        previous = segments[i - 1].lower() if i else ""
        if previous in _NAMED:
            out.append("{" + previous.rstrip("s") + "}")
            after_providers = 0
        elif previous == "providers":
            out.append(seg.lower())
            after_providers = 1
        elif after_providers:
            # after the namespace: type, name, type, name, ...
            out.append(seg.lower() if after_providers % 2 else "{name}")
            after_providers += 1
        else:
            out.append(seg.lower())
    query = sorted(
        (k.lower(), v if k.lower() in ("api-version", "$expand", "monitor") else "{value}")
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    rendered = "/" + "/".join(out)
    return rendered + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")


def _resource_of(url: str) -> str | None:
    """The resource a GET or PUT of ``url`` reads or writes (its path, lower-cased); None for operation URLs."""
    path = urlsplit(url).path.lower().rstrip("/")
    if re.search(r"/(operations|operationresults|asyncoperations)/", path) or "/resourcegroups/" not in path:
        return None
    return path


def shape(value: Any, prefix: str = "") -> set[str]:
    """The key paths of a JSON value: ``properties.storageProfile.osDisk.managedDisk.id``; lists as ``[]``."""
    if isinstance(value, dict):
        found = set()
        for k, v in value.items():
            if prefix.endswith(".tags") or prefix == "tags":
                continue  # user-chosen keys
            here = f"{prefix}.{k}" if prefix else k
            found |= {here} | shape(v, here)
        return found
    if isinstance(value, list):
        return set().union(*(shape(v, f"{prefix}[]") for v in value)) if value else set()
    return set()


@dataclass
class Summary:
    """What one recording says about each call (by template) and about the state each resource and operation
    went through (the distinct sequences seen per template)."""

    statuses: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    headers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    shapes: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    sequences: dict[str, set[tuple[str, ...]]] = field(default_factory=lambda: defaultdict(set))


def summarize(records: Iterable[dict[str, Any]]) -> Summary:
    """Per call template: statuses, protocol headers, response shape. Per resource: its provisioningState
    sequence over its GETs and PUTs; per operation: its status sequence over its polls."""
    summary = Summary()
    seen: dict[tuple[str, str], list[str]] = {}
    for record in records:
        key = f"{record['method']} {template_of(record['url'])}"
        summary.statuses[key].add(record["status"])
        summary.headers[key] |= set(record.get("headers") or {})
        body = record.get("response")
        if not isinstance(body, dict) or record["status"] >= 300:
            continue
        summary.shapes[key] |= shape(body)
        resource = _resource_of(record["url"])
        if resource is not None:
            state, kind, instance = (body.get("properties") or {}).get("provisioningState"), "resource", resource
        else:
            state, kind, instance = body.get("status"), "operation", urlsplit(record["url"]).path.lower()
        if isinstance(state, str):
            states = seen.setdefault((f"{kind} {template_of(instance)}", instance), [])
            if not states or states[-1] != state:
                states.append(state)
    for (template, _), states in seen.items():
        summary.sequences[template].add(tuple(states))
    return summary


def _topmost(paths: set[str]) -> list[str]:
    """The paths none of whose parents is among them: a missing object is one divergence, not one per field."""
    return sorted(p for p in paths if not any(p.startswith(q + ".") or p.startswith(q + "[]") for q in paths))


def diff(live: Iterable[dict[str, Any]], emulated: Iterable[dict[str, Any]]) -> list[str]:
    """Every way the emulated recording departs from the live one, one line each."""
    a, b = summarize(live), summarize(emulated)
    out: list[str] = []
    for key in sorted(set(a.statuses) | set(b.statuses)):
        if key not in b.statuses:
            out.append(f"{key}: made on Azure only")
            continue
        if key not in a.statuses:
            out.append(f"{key}: made on the emulator only")
            continue
        if a.statuses[key] != b.statuses[key]:
            out.append(f"{key}: status {sorted(a.statuses[key])} on Azure, {sorted(b.statuses[key])} emulated")
        out += [f"{key}: header {name} on Azure only" for name in sorted(a.headers[key] - b.headers[key])]
        out += [f"{key}: header {name} emulated only" for name in sorted(b.headers[key] - a.headers[key])]
        out += [f"{key}: body field {path} on Azure only" for path in _topmost(a.shapes[key] - b.shapes[key])]
        out += [f"{key}: body field {path} emulated only" for path in _topmost(b.shapes[key] - a.shapes[key])]
    for key in sorted(set(a.sequences) & set(b.sequences)):
        if a.sequences[key] != b.sequences[key]:
            live_seqs = "; ".join(" > ".join(s) for s in sorted(a.sequences[key]))
            emulated_seqs = "; ".join(" > ".join(s) for s in sorted(b.sequences[key]))
            out.append(f"{key}: states {live_seqs} on Azure, {emulated_seqs} emulated")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.azure_live.recording", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("diff", help="compare a live recording with an emulated one")
    compare.add_argument("live", type=Path)
    compare.add_argument("emulated", type=Path)
    args = parser.parse_args(argv)
    found = diff(read(args.live), read(args.emulated))
    for line in found:
        print(line)
    print(f"{len(found)} divergence(s)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
