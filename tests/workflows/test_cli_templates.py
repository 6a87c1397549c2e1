"""``kiln template``, ``kiln schedule`` and ``kiln trigger`` end to end: a real dev server, a worker on kiln-local
with the recording cloud, the commands run in-process."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.testing import WorkflowEnvironment

from tests.fixtures.recording_cloud import RecordingCloud
from tests.workflows.harness import wait_for_step
from tests.workflows.test_cli_e2e import cloud, kiln, template_file, unique  # noqa: F401  (fixtures)
from workflows.golden_models import entity_id
from workflows.image_template import ImageTemplateWorkflow


async def until_printed(capsys: pytest.CaptureFixture[str], text: str, *argv: str) -> str:
    """Run a command until its output shows ``text`` (the build list and schedules catch up within moments)."""
    async with asyncio.timeout(60):
        while True:
            assert await kiln(*argv) == 0
            out = capsys.readouterr().out
            if text in out:
                return out
            await asyncio.sleep(0.5)


async def test_a_template_is_created_run_shown_scheduled_and_deleted(
    cloud: RecordingCloud,  # noqa: F811
    template_file,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = unique("golden")
    assert await kiln("template", "create", name, str(template_file)) == 0
    assert f"Created template {name}; build it with `kiln template run {name}`" in capsys.readouterr().out
    assert await kiln("template", "create", name, str(template_file)) == 2
    assert f"template {name} already exists" in capsys.readouterr().err

    assert await kiln("template", "run", name) == 0
    out = capsys.readouterr().out
    assert f"Started build {name}-1 of template {name}" in out and "Succeeded" in out
    out = await until_printed(capsys, name, "template", "list")
    assert "Succeeded" in next(line for line in out.splitlines() if name in line)
    assert await kiln("template", "show", name) == 0
    out = capsys.readouterr().out
    assert "lastRunStatus Succeeded" in out and f"{name}-1" in out

    out = await until_printed(capsys, f"{name}-1", "images", "--template", name, "--cloud", "local")
    assert "configure.sh" in out  # a staged file, with its sha256
    version = next(w for w in out.split() if "/versions/" in w)
    assert await kiln("retention", "run", name, "--keep", "1", "--dry-run") == 0
    assert f"kept  {version}" in capsys.readouterr().out
    assert await kiln("images", "revoke", version, "--reason", "bad kernel") == 0
    assert f"revoked {version}" in capsys.readouterr().out
    out = await until_printed(capsys, "revoked (bad kernel)", "images", "--template", name, "--cloud", "local")

    schedule = unique("weekly")
    assert await kiln("schedule", "create", schedule, "--template", name, "--cron", "0 3 * * 0") == 0
    assert "when source-changed" in capsys.readouterr().out  # the default for a latest source
    assert await kiln("schedule", "describe", schedule) == 0
    assert "next runs: " in capsys.readouterr().out
    assert await kiln("schedule", "trigger", schedule) == 0
    capsys.readouterr()
    out = await until_printed(capsys, "skipped: source unchanged", "schedule", "describe", schedule)
    assert "Skipped" in out
    assert await kiln("schedule", "pause", schedule, "--note", "freeze") == 0
    assert await kiln("schedule", "describe", schedule) == 0
    assert "paused" in capsys.readouterr().out
    assert await kiln("schedule", "delete", schedule) == 0
    assert await kiln("schedule", "describe", schedule) == 2
    assert f"no schedule named {schedule}" in capsys.readouterr().err

    assert await kiln("trigger", "create", name, "--interval", "1h") == 0
    assert "Healthy Trigger is active." in capsys.readouterr().out
    assert await kiln("trigger", "create", name) == 2
    assert "AIB allows one SourceImage trigger per template" in capsys.readouterr().err
    assert await kiln("trigger", "delete", name) == 0

    assert await kiln("template", "delete", name) == 0
    assert await kiln("template", "show", name) == 2
    assert f"no template named {name}" in capsys.readouterr().err


async def test_delete_is_refused_while_the_template_builds(
    cloud: RecordingCloud,  # noqa: F811
    template_file,  # noqa: F811
    env: WorkflowEnvironment,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = env.client
    name = unique("busy")
    assert await kiln("template", "create", name, str(template_file)) == 0
    cloud.inject("customize", "hang", times=1)
    assert await kiln("template", "run", name, "--no-wait") == 0
    await wait_for_step(client.get_workflow_handle(f"{name}-1"), "customize")
    capsys.readouterr()

    assert await kiln("template", "delete", name) == 2
    assert f"cannot be deleted while build {name}-1 runs" in capsys.readouterr().err
    assert await kiln("template", "run", name) == 2
    assert f"already running build {name}-1" in capsys.readouterr().err
    assert await kiln("template", "cancel", name) == 0
    assert await kiln("watch", f"{name}-1") == 130
    handle = client.get_workflow_handle(entity_id(name))
    async with asyncio.timeout(30):
        while not (await handle.query(ImageTemplateWorkflow.describe)).runs[0].finished:
            await asyncio.sleep(0.3)
    assert await kiln("template", "delete", name) == 0
