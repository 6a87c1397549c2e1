"""Encrypted payloads: a build's history holds none of its template in plain text, and the codec server opens it
for the Temporal CLI (and the Web UI) of those who hold the key."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from temporalio.api.common.v1 import Payload
from temporalio.client import Client

from activities.codec import (
    KEY_ID,
    CodecKeyError,
    EncryptionCodec,
    keys_from_environment,
    new_key_entry,
    parse_keys,
)
from activities.connection import connect
from cli.codec_server import start_codec_server
from tests.services import free_port, temporal_cli
from tests.workflows.harness import Harness, serving
from workflows.models import RunState

MARKER = f"echo kiln-secret-{uuid.uuid4().hex}"
UI_ORIGIN = "http://127.0.0.1:8233"


def codec(*entries: str) -> EncryptionCodec:
    return EncryptionCodec(parse_keys("\n".join(entries), source="test"))


@pytest_asyncio.fixture
async def sealed(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Harness, EncryptionCodec]]:
    """A worker and a client that both seal payloads with the key in KILN_CODEC_KEYS, as every process of a
    deployment does."""
    entry = new_key_entry("2026-12")
    monkeypatch.setenv("KILN_CODEC_KEYS", entry)
    sealed_client = await connect(address=client.service_client.config.target_host)
    monkeypatch.delenv("KILN_CODEC_KEYS")
    keys = codec(entry)
    async with serving(sealed_client, tmp_path / "sealed") as harness:
        yield harness, keys


@pytest_asyncio.fixture
async def codec_endpoint(sealed: tuple[Harness, EncryptionCodec]) -> AsyncIterator[str]:
    port = free_port()
    runner = await start_codec_server(sealed[1], host="127.0.0.1", port=port, origins=[UI_ORIGIN])
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def exported_history(client: Client, workflow_id: str, *extra: str) -> str:
    """``temporal workflow show --output json``: the history as a user exports it."""
    process = await asyncio.create_subprocess_exec(
        temporal_cli(),
        "workflow",
        "show",
        "--address",
        client.service_client.config.target_host,
        "--workflow-id",
        workflow_id,
        "--output",
        "json",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await process.communicate()
    assert process.returncode == 0, errors.decode()
    return output.decode()


def readable_text(history: str) -> str:
    """The exported history with every base64 field decoded beside it: what anyone with the export can read."""
    found: list[str] = [history]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            try:
                found.append(base64.b64decode(node, validate=True).decode("utf-8", errors="replace"))
            except ValueError:
                pass

    walk(json.loads(history))
    return "\n".join(found)


def with_marker(harness: Harness) -> dict[str, Any]:
    template = harness.template()
    template["properties"]["customize"][0]["inline"] = [MARKER, "sudo apt-get install -y tree"]
    return template


async def test_a_sealed_builds_history_holds_no_byte_of_its_inline_commands(
    sealed: tuple[Harness, EncryptionCodec], harness: Harness, client: Client
) -> None:
    sealed_harness, _ = sealed
    template = with_marker(sealed_harness)
    handle = await sealed_harness.start(template)
    status = await sealed_harness.finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message
    readable = readable_text(await exported_history(client, handle.id))
    steps = template["properties"]["customize"] + template["properties"]["validate"]["inVMValidations"]
    commands = [line for step in steps for line in step.get("inline", [])]
    assert len(commands) == 3 and not [line for line in commands if line in readable]

    # The same build without keys, read the same way: the commands are there, so the search above can see them.
    plain = await harness.start(with_marker(harness))
    assert (await harness.finish(plain)).run_state == RunState.SUCCEEDED
    assert MARKER in readable_text(await exported_history(client, plain.id))


async def test_the_temporal_cli_reads_a_sealed_history_through_the_codec_server(
    sealed: tuple[Harness, EncryptionCodec], codec_endpoint: str, client: Client
) -> None:
    harness, _ = sealed
    handle = await harness.start(with_marker(harness))
    await harness.finish(handle)
    opened = await exported_history(client, handle.id, "--codec-endpoint", codec_endpoint)
    assert MARKER in readable_text(opened)


async def test_a_build_started_with_a_plain_input_still_builds_on_a_sealing_worker(
    sealed: tuple[Harness, EncryptionCodec], client: Client
) -> None:
    """The Temporal CLI or the Web UI form without a codec endpoint writes the template in plain JSON."""
    harness, _ = sealed
    name = f"plain-{uuid.uuid4().hex[:8]}"
    await client.start_workflow("ImageBuild", harness.template(), id=name, task_queue=harness.task_queue)
    status = await harness.finish(harness.client.get_workflow_handle(name))
    assert status.run_state == RunState.SUCCEEDED, status.message


async def test_the_codec_server_round_trips_and_answers_the_web_uis_preflight(
    sealed: tuple[Harness, EncryptionCodec], codec_endpoint: str
) -> None:
    plain = {"payloads": [{"metadata": {"encoding": base64.b64encode(b"json/plain").decode()}, "data": ""}]}
    plain["payloads"][0]["data"] = base64.b64encode(json.dumps({"inline": [MARKER]}).encode()).decode()
    headers = {"Origin": UI_ORIGIN, "X-Namespace": "default", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.options(
            f"{codec_endpoint}/decode",
            headers={
                "Origin": UI_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        ) as preflight:
            assert preflight.status == 204
            assert preflight.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
            assert "X-Namespace" in preflight.headers["Access-Control-Allow-Headers"]
        async with http.post(f"{codec_endpoint}/encode", json=plain, headers=headers) as response:
            assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
            encoded = await response.json()
        assert MARKER not in readable_text(json.dumps(encoded))
        async with http.post(f"{codec_endpoint}/decode", json=encoded, headers=headers) as response:
            assert await response.json() == plain
        async with http.post(f"{codec_endpoint}/decode", json=plain, headers={"Origin": "http://evil.test"}) as other:
            assert "Access-Control-Allow-Origin" not in other.headers  # a page elsewhere cannot read the answer


async def test_keys_rotate_the_newest_seals_and_every_key_opens() -> None:
    old, new = new_key_entry("2026-11"), new_key_entry("2026-12")
    before = await codec(old).encode([Payload(metadata={"encoding": b"json/plain"}, data=b'"hello"')])
    rotated = codec(new, old)
    assert (await rotated.decode(before))[0].data == b'"hello"'
    after = await rotated.encode([Payload(data=b'"again"')])
    assert after[0].metadata[KEY_ID] == b"2026-12"
    with pytest.raises(CodecKeyError, match="'2026-12', which is not among the configured keys"):
        await codec(old).decode(after)


def test_key_settings_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(CodecKeyError, match="KILN_CODEC_KEYS, line 1, entry 'short': an AES-256 key is 32 bytes"):
        keys_from_environment({"KILN_CODEC_KEYS": f"short:{base64.b64encode(b'x' * 16).decode()}"})
    with pytest.raises(CodecKeyError, match="expected KEY_ID:BASE64_KEY"):
        keys_from_environment({"KILN_CODEC_KEYS": "no-separator"})
    key_file = tmp_path / "keys"
    key_file.write_text(f"# rotated monthly\n{new_key_entry('b')}\n{new_key_entry('a')}\n")
    assert [k.key_id for k in keys_from_environment({"KILN_CODEC_KEY_FILE": str(key_file)})] == ["b", "a"]
    with pytest.raises(CodecKeyError, match="No such file"):
        keys_from_environment({"KILN_CODEC_KEY_FILE": str(tmp_path / "missing")})
    assert keys_from_environment({}) == []
