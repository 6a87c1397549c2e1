"""The Temporal Web UI in a real browser (Debian's chromium, driven by playwright-core): a build started from
the Start Workflow page with its template uploaded, found in the list by KilnRunState, opened, and its input
shown decrypted through kiln's codec server. The payloads in history are sealed throughout.

Screenshots are kept in ``$KILN_TEST_ARTIFACTS/web-ui`` (default ``test-artifacts/web-ui``).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from temporalio.client import Client

from activities.codec import ENCODING, EncryptionCodec, new_key_entry, parse_keys
from activities.connection import ConnectError, connect
from cli.codec_server import start_codec_server
from tests.fixtures.recording_cloud import RecordingCloud
from tests.services import free_port, temporal_cli
from tests.workflows.harness import finish, linux_template
from worker import run_worker
from workflows.models import SEARCH_ATTRIBUTES, RunState

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("web_ui_browser.mjs")
SHOTS = Path(os.environ.get("KILN_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web-ui"
TASK_QUEUE = "kiln-local"


async def wait_for_http(url: str, *, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection(*url.removeprefix("http://").split(":"))
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.2)


@pytest_asyncio.fixture
async def ui_with_codec(tmp_path: Path) -> AsyncIterator[tuple[str, Client, EncryptionCodec]]:
    """A dev server of its own whose Web UI decodes through a codec server, and a recording-cloud worker on
    ``kiln-local``, all sealing with one key."""
    port, ui_port, codec_port = free_port(), free_port(), free_port()
    ui = f"http://127.0.0.1:{ui_port}"
    codec_url = f"http://127.0.0.1:{codec_port}"
    args = [
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--ui-codec-endpoint",
        codec_url,
        "--ui-disable-news-fetch",  # the news feed would reach outside this machine
        "--log-level",
        "error",
    ]
    for key in SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{key.name}=Keyword"]
    server = await asyncio.create_subprocess_exec(temporal_cli(), *args, stdout=asyncio.subprocess.DEVNULL)
    codec = EncryptionCodec(parse_keys(new_key_entry("ui"), source="test"))
    runner = await start_codec_server(codec, host="127.0.0.1", port=codec_port, origins=[ui])
    stop = asyncio.Event()
    worker: asyncio.Task[None] | None = None
    try:
        await wait_for_http(f"http://127.0.0.1:{port}")
        await wait_for_http(ui)
        async with asyncio.timeout(60):
            while True:  # the frontend answers before it is healthy
                try:
                    client = await connect(address=f"127.0.0.1:{port}", codec=codec)
                    break
                except ConnectError:
                    await asyncio.sleep(0.5)
        cloud = RecordingCloud(tmp_path / "cloud.db")
        worker = asyncio.create_task(run_worker(client, cloud, guests=cloud.guests(), task_queue=TASK_QUEUE, stop=stop))
        yield ui, client, codec
    finally:
        stop.set()
        if worker is not None:
            await worker
        await runner.cleanup()
        server.terminate()
        await server.wait()


async def test_a_build_started_in_the_browser_is_listed_opened_and_shows_its_input_decrypted(
    ui_with_codec: tuple[str, Client, EncryptionCodec], tmp_path: Path
) -> None:
    ui, client, _ = ui_with_codec
    marker = f"echo from-the-browser-{uuid.uuid4().hex[:12]}"
    template = linux_template(tmp_path)
    template["properties"]["customize"][0]["inline"] = [marker]
    template_file = tmp_path / "template.json"
    template_file.write_text(json.dumps(template, indent=2))
    name = f"browser-{uuid.uuid4().hex[:8]}"
    SHOTS.mkdir(parents=True, exist_ok=True)

    driver = await asyncio.create_subprocess_exec(
        "node",
        str(DRIVER),
        cwd=ROOT,
        env={
            **os.environ,
            "UI": ui,
            "WORKFLOW_ID": name,
            "TASK_QUEUE": TASK_QUEUE,
            "TEMPLATE": str(template_file),
            "SHOTS": str(SHOTS),
            "MARKER": marker,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await asyncio.wait_for(driver.communicate(), timeout=240)
    lines = output.decode().strip().splitlines()
    assert lines, errors.decode()
    result = json.loads(lines[-1])
    assert result["ok"], f"{result}\n{errors.decode()}\nscreenshots: {SHOTS}"
    assert result["codecCalls"] == ["/decode", "/encode"]  # the form sealed the input, the page opened it

    handle = client.get_workflow_handle(name)
    status = await finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message
    # What the form sent through the codec server is sealed in history, as a key holder's worker writes it.
    async for event in handle.fetch_history_events():
        started = event.workflow_execution_started_event_attributes
        assert started.input.payloads[0].metadata["encoding"] == ENCODING
        break
    for shot in ("1-start-workflow.png", "2-list-by-run-state.png", "3-build-with-decrypted-input.png"):
        assert (SHOTS / shot).stat().st_size > 10_000
