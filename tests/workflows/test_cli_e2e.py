"""The ``kiln`` CLI end to end: a real dev server, a worker with the recording cloud, the commands run in-process.

The CLI runs its own event loop (``asyncio.run``), so each command runs in a thread beside the test's loop,
where the worker lives. The worker serves ``kiln-local``, the queue ``kiln build`` starts local builds on.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from activities.clouds.registry import task_queue
from cli.main import main
from tests.fixtures.recording_cloud import RecordingCloud
from tests.workflows.harness import linux_template, wait_for_step
from worker import run_worker
from workflows.build import ImageBuildWorkflow

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "templates"
sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from start_build import start_build  # noqa: E402  (the example is tested as it is)


@pytest_asyncio.fixture
async def cloud(
    env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RecordingCloud]:
    """A worker on kiln-local with a fresh recording cloud, and the CLI pointed at the test server."""
    monkeypatch.setenv("TEMPORAL_ADDRESS", env.client.service_client.config.target_host)
    cloud = RecordingCloud(tmp_path / "cloud.db")
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(env.client, cloud, guests=cloud.guests(), task_queue=task_queue("local"), stop=stop)
    )
    yield cloud
    stop.set()
    await worker


@pytest.fixture
def template_file(tmp_path: Path) -> Path:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(linux_template(artifacts)))
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def kiln(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def build_held_in_customize(cloud: RecordingCloud, template_file: Path, client: Client, prefix: str) -> str:
    """Start a build with `kiln build --no-wait` whose first customizer hangs, and wait until it runs; its name."""
    name = unique(prefix)
    cloud.inject("customize", "hang", times=1)
    assert await kiln("build", str(template_file), "--name", name, "--no-wait") == 0
    await wait_for_step(client.get_workflow_handle(name), "customize")
    return name


async def test_build_watches_to_success_then_status_logs_and_list(
    cloud: RecordingCloud, template_file: Path, env: WorkflowEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique("golden")
    assert await kiln("build", str(template_file), "--name", name) == 0
    out = capsys.readouterr().out
    assert f"Started build {name} on task queue kiln-local" in out
    assert "✓ customize 2/3: configure" in out  # the step events, as printed when not on a terminal
    assert "Succeeded" in out
    for output in ("gallery", "managed", "vhd"):
        assert output in out

    assert await kiln("status", name, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["runState"] == "Succeeded"
    assert status["logUri"].startswith("file://")

    assert await kiln("logs", name) == 0
    # what the recording guest's first script prints
    assert f"{status['buildId']}-customization-0 line 0\n" in capsys.readouterr().out

    assert await kiln("logs", name, "--validation") == 0
    assert "validate" in capsys.readouterr().out

    assert await kiln("cancel", name) == 2
    assert "already finished (Succeeded)" in capsys.readouterr().err

    async with asyncio.timeout(30):  # the build list is eventually consistent
        while True:
            assert await kiln("list", "--state", "succeeded", "--limit", "50") == 0
            listed = capsys.readouterr().out
            if name in listed:
                break
            await asyncio.sleep(0.5)
    row = next(line for line in listed.splitlines() if name in line)
    assert "Succeeded" in row and "local" in row and "Debian:debian-12:12:latest" in row


async def test_failed_build_exits_1_and_names_the_step(
    cloud: RecordingCloud, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud.inject("customize", "fatal", times=1)
    assert await kiln("build", str(template_file), "--name", unique("failing")) == 1
    out = capsys.readouterr().out
    assert "Failed" in out
    assert "customize 1/3: packages failed" in out


async def test_one_failed_target_is_partial_success_exit_3(
    cloud: RecordingCloud, template_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud.inject("distribute:vhd", "fatal")
    assert await kiln("build", str(template_file), "--name", unique("partial")) == 3
    assert "PartiallySucceeded" in capsys.readouterr().out


async def test_cancel_waits_for_cleanup_and_a_second_start_is_refused(
    cloud: RecordingCloud, template_file: Path, env: WorkflowEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    name = await build_held_in_customize(cloud, template_file, env.client, "canceled")

    assert await kiln("build", str(template_file), "--name", name) == 2
    assert f"a build named {name} is already running" in capsys.readouterr().err

    assert await kiln("cancel", name) == 0
    out = capsys.readouterr().out
    assert "cleanup: delete build VM" in out
    assert "Canceled" in out
    assert cloud.alive() == []

    assert await kiln("watch", name) == 130  # watching a canceled build ends with its exit code


async def test_deadline_gives_a_running_build_more_time_or_ends_it(
    cloud: RecordingCloud, template_file: Path, env: WorkflowEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    name = await build_held_in_customize(cloud, template_file, env.client, "deadline")

    assert await kiln("deadline", name, "2h") == 0
    assert f"build {name} now times out at" in capsys.readouterr().out
    assert await kiln("deadline", name, "1m") == 0
    status = await env.client.get_workflow_handle(name).query(ImageBuildWorkflow.status)
    assert status.deadline is not None and status.deadline - status.start_time < timedelta(minutes=2)

    await env.client.get_workflow_handle(name).cancel()
    assert await kiln("watch", name) == 130
    assert await kiln("deadline", name, "1h") == 2  # a finished build has no deadline to move
    assert "has already finished (Canceled); it has no deadline to move" in capsys.readouterr().err


async def test_warnings_reach_the_user_however_the_build_was_started(
    cloud: RecordingCloud, env: WorkflowEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    template = TEMPLATES / "warn_older_api.json"  # apiVersion 2022-07-01, with fields it does not know
    assert await kiln("build", str(template), "--name", unique("older-api")) == 0
    assert "warning: properties.distribute[0].aritfactTags: Unknown field 'aritfactTags'" in capsys.readouterr().err

    # Started without kiln, as the Temporal CLI or the Web UI start one: the build's status keeps them.
    name = unique("older-api")
    handle = await env.client.start_workflow(
        "ImageBuild", json.loads(template.read_text()), id=name, task_queue=task_queue("local")
    )
    await handle.result()
    assert await kiln("status", name) == 0
    out = capsys.readouterr().out
    assert "Accepted with warnings:" in out
    assert "warning: properties.optimize.vmboot: Field 'vmboot' is read as 'vmBoot'" in out
    assert await kiln("status", name, "--json") == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert sorted(w["path"] for w in warnings) == [
        "properties.distribute[0].aritfactTags",
        "properties.distribute[1].tags",
        "properties.errorHandling",
        "properties.optimize.vmboot",
    ]


async def test_unknown_build_exits_2(cloud: RecordingCloud, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("watch", "status", "cancel", "logs"):
        assert await kiln(command, "no-such-build") == 2
        assert "no build named no-such-build" in capsys.readouterr().err


async def test_the_python_example_returns_run_outputs(cloud: RecordingCloud, template_file: Path) -> None:
    status = await start_build(template_file, name=unique("example"))
    assert sorted(o.run_output_name for o in status.run_outputs) == ["gallery", "managed", "vhd"]

    cloud.inject("create_vm", "fatal", times=1)
    with pytest.raises(WorkflowFailureError):
        await start_build(template_file, name=unique("example"))
