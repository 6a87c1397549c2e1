"""The Temporal Web UI in a real browser (Debian's chromium, driven by playwright-core), as the people who use
kiln's builds see it: a build started from the Start Workflow page with its template uploaded, found in the list by
KilnRunState, opened, and its input shown decrypted through kiln's codec server to the key holder and as ciphertext
to a UI without the codec endpoint; and a schedule made with ``kiln schedule create`` on the Schedules page with its
spec and its run, its build found by KilnTemplate. The payloads in history are sealed throughout.

Screenshots are kept in ``$KILN_TEST_ARTIFACTS/web-ui`` (default ``test-artifacts/web-ui``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from activities.codec import ENCODING, KEYS_VARIABLE, EncryptionCodec, new_key_entry, parse_keys
from activities.connection import ConnectError, connect
from cli.codec_server import start_codec_server
from tests.fixtures.recording_cloud import RecordingCloud
from tests.services import free_port, temporal_cli
from tests.workflows.harness import finish, linux_template
from tests.workflows.test_cli_e2e import kiln
from tests.workflows.test_schedules import scheduled_results
from worker import run_worker
from workflows.golden_models import entity_id
from workflows.models import SEARCH_ATTRIBUTES, RunState

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("web_ui_browser.mjs")
SHOTS = Path(os.environ.get("KILN_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web-ui"
TASK_QUEUE = "kiln-local"
KEY_ID = "ui"


@dataclass(frozen=True)
class WebUi:
    url: str
    address: str  # the dev server's frontend, host:port
    client: Client
    key_entry: str  # what KILN_CODEC_KEYS holds for a key holder's CLI


async def wait_for_http(url: str, *, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection(*url.removeprefix("http://").split(":"))
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module")
async def ui_with_codec(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WebUi]:
    """A dev server of its own whose Web UI decodes through a codec server, and a recording-cloud worker on
    ``kiln-local``, all sealing with one key. The module's tests share it: a dev server takes seconds to start."""
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
    key_entry = new_key_entry(KEY_ID)
    codec = EncryptionCodec(parse_keys(key_entry, source="test"))
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
        cloud = RecordingCloud(tmp_path_factory.mktemp("web-ui") / "cloud.db")
        worker = asyncio.create_task(run_worker(client, cloud, guests=cloud.guests(), task_queue=TASK_QUEUE, stop=stop))
        yield WebUi(url=ui, address=f"127.0.0.1:{port}", client=client, key_entry=key_entry)
    finally:
        stop.set()
        if worker is not None:
            await worker
        await runner.cleanup()
        server.terminate()
        await server.wait()


def template_with(marker: str, directory: Path) -> Path:
    """A template file whose first inline command is ``marker``, a text to look for on the page."""
    template = linux_template(directory)
    template["properties"]["customize"][0]["inline"] = [marker]
    path = directory / "template.json"
    path.write_text(json.dumps(template, indent=2))
    return path


def as_the_ui_shows(moment: datetime) -> str:
    """A time as the UI writes it in UTC: ``Dec 6, 2026, 3:00:00.00 AM UTC``."""
    moment = moment.astimezone(UTC)
    hour = moment.hour % 12 or 12
    return f"{moment:%b} {moment.day}, {moment.year}, {hour}:{moment:%M:%S}.{moment.microsecond // 10_000:02d} {moment:%p} UTC"


async def walk(scenario: str, **env: str) -> dict:
    """Run one of the driver's walks through the UI and return what it read; its screenshots land in SHOTS."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver = await asyncio.create_subprocess_exec(
        "node",
        str(DRIVER),
        cwd=ROOT,
        env={**os.environ, "SCENARIO": scenario, "SHOTS": str(SHOTS), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await asyncio.wait_for(driver.communicate(), timeout=360)
    lines = output.decode().strip().splitlines()
    assert lines, errors.decode()
    result = json.loads(lines[-1])
    assert result["ok"], f"{result}\n{errors.decode()}\nscreenshots: {SHOTS}"
    return result


async def test_a_build_started_in_the_browser_shows_its_input_to_the_key_holder_and_ciphertext_to_others(
    ui_with_codec: WebUi, tmp_path: Path
) -> None:
    marker = f"echo from-the-browser-{uuid.uuid4().hex[:12]}"
    name = f"browser-{uuid.uuid4().hex[:8]}"
    result = await walk(
        "start",
        UI=ui_with_codec.url,
        WORKFLOW_ID=name,
        TASK_QUEUE=TASK_QUEUE,
        TEMPLATE=str(template_with(marker, tmp_path)),
        MARKER=marker,
        SEALED_ENCODING=base64.b64encode(ENCODING).decode(),
    )
    assert result["codecCalls"] == ["/decode", "/encode"]  # the form sealed the input, the page opened it

    handle = ui_with_codec.client.get_workflow_handle(name)
    status = await finish(handle)
    assert status.run_state == RunState.SUCCEEDED, status.message
    # What the form sent through the codec server is sealed in history, as a key holder's worker writes it.
    events = [event async for event in handle.fetch_history_events()]
    sealed = events[0].workflow_execution_started_event_attributes.input.payloads[0]
    assert sealed.metadata["encoding"] == ENCODING
    sealed_result = events[-1].workflow_execution_completed_event_attributes.result.payloads[0]

    # Without the codec endpoint the page asks no codec server and shows input and result as the sealed bytes they
    # are; the start event's payload says binary/encrypted (the UI shows metadata base64-encoded, as history has it).
    keyless = result["keyless"]
    assert keyless["codecCalls"] == []
    for payload in (sealed, sealed_result):
        assert f'"{base64.b64encode(payload.data).decode()}"' in keyless["input"]
    event = keyless["event"]
    assert f'"encoding": "{base64.b64encode(ENCODING).decode()}"' in event
    assert f'"encryption-key-id": "{base64.b64encode(KEY_ID.encode()).decode()}"' in event
    assert marker not in keyless["page"]
    for shot in (
        "1-start-workflow.png",
        "2-list-by-run-state.png",
        "3-build-with-decrypted-input.png",
        "4-build-without-the-key.png",
    ):
        assert (SHOTS / shot).stat().st_size > 10_000


async def test_a_kiln_schedule_is_on_the_schedules_page_with_its_spec_and_run_and_its_build_in_the_list(
    ui_with_codec: WebUi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI as a key holder runs it against this dev server.
    monkeypatch.setenv("TEMPORAL_ADDRESS", ui_with_codec.address)
    monkeypatch.setenv(KEYS_VARIABLE, ui_with_codec.key_entry)
    template = f"golden-{uuid.uuid4().hex[:6]}"
    schedule = f"weekly-{uuid.uuid4().hex[:6]}"
    template_file = template_with(f"echo scheduled-{uuid.uuid4().hex[:12]}", tmp_path)
    assert await kiln("template", "create", template, str(template_file)) == 0
    assert await kiln("schedule", "create", schedule, "--template", template, "--cron", "0 3 * * 0") == 0
    assert await kiln("schedule", "trigger", schedule) == 0
    client = ui_with_codec.client
    handle = client.get_schedule_handle(schedule)
    [record] = await scheduled_results(client, handle, 1)
    assert record.run_state == "Succeeded" and record.build == f"{template}-1", record

    description = await handle.describe()
    run = description.info.recent_actions[0].action.workflow_id
    spec = "At 03:00 on Sunday"  # how the UI reads the cron '0 3 * * 0'

    result = await walk(
        "schedule",
        UI=ui_with_codec.url,
        SCHEDULE_ID=schedule,
        SCHEDULE_RUN=run,
        TEMPLATE_NAME=template,
        BUILD=record.build,
        SPEC=spec,
    )
    # The list: the schedule by its id, what it starts, its next run and its spec.
    for shown in (schedule, "KilnScheduledRun", as_the_ui_shows(description.info.next_action_times[0]), spec):
        assert shown in result["listRow"], (shown, result["listRow"])
    # Its page: the spec, the run that built, and its note and input (decrypted for the key holder).
    assert result["recentStatus"].upper() == "COMPLETED"
    detail = result["detail"]
    assert f"runs template {template} (source-changed)" in detail
    assert f'"template": "{template}"' in detail
    # Filtered by KilnTemplate: the template's entity, the scheduled run and its build, nothing else.
    listed = {row["links"][0]: row["text"] for row in result["workflows"]}
    assert set(listed) == {entity_id(template), run, record.build}, listed
    assert "ImageBuild" in listed[record.build] and "KilnScheduledRun" in listed[run]
    for shot in ("5-schedules.png", "6-schedule.png", "7-list-by-template.png"):
        assert (SHOTS / shot).stat().st_size > 10_000
