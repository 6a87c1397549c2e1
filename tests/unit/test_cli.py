"""The ``kiln`` CLI without a Temporal server: argument parsing, template checks, exit codes, log reading."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from activities.connection import ConnectError, connect
from cli import commands
from cli.builds import EXIT_CODES, exit_code
from cli.logs import read_log, sibling_log
from cli.main import main, parser
from cli.progress import LogTail, format_duration, summary
from tests.fixtures import CORPUS
from workflows.models import BuildStatus, Resource, RunOutput, RunState, StepRecord

LINUX = CORPUS / "q0_helloImageTemplateLinux.json"
TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
REPOSITORY = Path(__file__).resolve().parents[2]
ARM = CORPUS / "q1_armTemplateWinSIG.json"

BAD_TEMPLATE = {
    "location": 1,
    "properties": {"source": {"type": "Bogus"}, "customize": [{"type": "Shell", "name": "x", "inline": "not a list"}]},
}


@pytest.fixture
def bad_template(tmp_path: Path) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD_TEMPLATE))
    return path


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach Temporal fails the test."""

    async def refuse(**_: object) -> None:
        raise AssertionError("the command tried to connect to Temporal")

    monkeypatch.setattr(commands, "connect", refuse)


def test_validate_accepts_a_corpus_template(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(LINUX)]) == 0
    assert capsys.readouterr().out.strip() == "OK: q0_helloImageTemplateLinux"


def test_validate_resolves_an_arm_wrapper_with_its_parameters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parameters = tmp_path / "parameters.json"
    values = {"imageTemplateName": "win-sig", "api-version": "2022-02-14", "svclocation": "westus2"}
    parameters.write_text(json.dumps({"parameters": {k: {"value": v} for k, v in values.items()}}))

    assert main(["validate", str(ARM), "--parameters", str(parameters)]) == 0
    assert capsys.readouterr().out.strip() == "OK: win-sig"


def test_validate_names_every_unresolved_arm_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ARM)]) == 2
    out = capsys.readouterr().out
    assert "3 problems" in out
    for parameter in ("imageTemplateName", "api-version", "svclocation"):
        assert f"[parameters('{parameter}')]" in out  # brackets survive: no rich markup on user text


def test_validate_prints_every_issue_with_its_path(bad_template: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(bad_template)]) == 2
    out = capsys.readouterr().out
    assert f"{bad_template}: " in out
    for path in ("location", "properties.source.type", "properties.distribute"):
        assert f"\n  {path}: " in out


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "No such file"), ("{not json", "invalid JSON at line 1")],
    ids=["missing", "not-json"],
)
def test_validate_reports_an_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, expected: str
) -> None:
    path = tmp_path / "template.json"
    if content is not None:
        path.write_text(content)
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().out


def test_validate_prints_what_aib_accepts_only_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(TEMPLATES / "warn_older_api.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: warn_older_api (4 warnings)\n")
    assert "  warning: properties.distribute[0].aritfactTags: Unknown field 'aritfactTags'" in out
    assert "  warning: properties.optimize.vmboot: Field 'vmboot' is read as 'vmBoot'" in out


def test_validate_warns_of_a_missing_identity_only_for_azure(capsys: pytest.CaptureFixture[str]) -> None:
    vhd = CORPUS / "q4_helloImageTemplateVHD.json"
    assert main(["validate", str(vhd)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["validate", str(vhd), "--cloud", "azure"]) == 0
    assert "  warning: identity: Missing field 'identity'" in capsys.readouterr().out


def test_validate_takes_the_deployment_context_an_arm_template_reads(capsys: pytest.CaptureFixture[str]) -> None:
    arm = ["validate", str(TEMPLATES / "arm_bicep_style.json"), "--parameters"]
    arm.append(str(TEMPLATES / "arm_parameters_with_comments.json"))
    assert main([*arm, "--subscription", "0000", "--resource-group", "images-rg", "--location", "westeurope"]) == 0
    assert capsys.readouterr().out.strip() == "OK: debian.golden"

    assert main([*arm, "--subscription", "0000"]) == 2
    out = capsys.readouterr().out
    assert "resources[1].tags.group: Cannot resolve [resourceGroup().name]: resourceGroup().name needs the " in out
    assert "give --resource-group" in out and "give --location" in out


def test_schema_prints_the_template_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"location", "properties"} <= set(schema["properties"])


def test_schema_piped_into_head_ends_without_a_traceback() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader has gone before kiln writes: every write meets a broken pipe
    process = subprocess.run(
        [sys.executable, "-m", "cli", "schema"],
        cwd=REPOSITORY,
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        check=False,
    )
    os.close(write)
    assert process.stderr == ""
    assert process.returncode == 141


def test_build_with_a_bad_template_exits_2_without_connecting(
    bad_template: Path, no_server: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build", str(bad_template)]) == 2
    captured = capsys.readouterr()
    assert "properties.source.type" in captured.err
    assert captured.out == ""


def test_build_refuses_a_bad_name_without_connecting(no_server: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", str(LINUX), "--name", "no spaces please"]) == 2
    assert "'no spaces please' cannot name a build" in capsys.readouterr().err


def test_an_unreachable_server_is_named_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", "127.0.0.1:1", "status", "anything"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to Temporal at 127.0.0.1:1" in err
    assert "python worker.py --dev" in err


async def test_connect_reports_an_unreadable_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text("this is [[ not toml")
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(config))
    with pytest.raises(ConnectError, match="cannot read the Temporal client configuration"):
        await connect()


@pytest.mark.parametrize(
    ("argv", "attribute", "value"),
    [
        (["--address", "a:1", "list"], "address", "a:1"),
        (["list", "--address", "b:2"], "address", "b:2"),
        (["--namespace", "n1", "status", "x"], "namespace", "n1"),
        (["list", "--state", "partiallysucceeded"], "state", "PartiallySucceeded"),
        (["list"], "limit", 20),
        (["build", "t.json"], "cloud", "local"),
        (["logs", "x", "-f", "--validation"], "follow", True),
    ],
)
def test_arguments(argv: list[str], attribute: str, value: object) -> None:
    assert getattr(parser().parse_args(argv), attribute) == value


@pytest.mark.parametrize(
    "argv",
    [[], ["list", "--state", "Done"], ["list", "--limit", "0"], ["build", "t.json", "--cloud", "aws"], ["watch"]],
    ids=["no-command", "bad-state", "bad-limit", "bad-cloud", "no-name"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: kiln" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "Exit codes" in capsys.readouterr().out


def test_exit_codes_follow_the_run_state() -> None:
    assert {state: exit_code(BuildStatus(run_state=state)) for state in EXIT_CODES} == {
        RunState.SUCCEEDED: 0,
        RunState.FAILED: 1,
        RunState.PARTIALLY_SUCCEEDED: 3,
        RunState.CANCELED: 130,
    }


def test_summary_shows_outputs_leftovers_and_log() -> None:
    started = datetime(2026, 1, 1, tzinfo=UTC)
    status = BuildStatus(
        build_id="golden-1a2b3c4d",
        template_name="golden",
        run_state=RunState.PARTIALLY_SUCCEEDED,
        message="Failed in distributing 1 images out of total 2: vhd: [quota] exceeded",
        start_time=started,
        end_time=started + timedelta(minutes=12, seconds=3),
        run_outputs=[
            RunOutput(
                run_output_name="gallery",
                type="SharedImage",
                artifact_id="/sub/img/1.0.0",
                replication={"westeurope": "Completed"},
            ),
            RunOutput(run_output_name="vhd", type="VHD", provisioning_state="Failed", message="quota"),
        ],
        resources=[Resource(id="/sub/rg/vm", kind="VirtualMachine", owner="golden-build")],
        steps=[StepRecord(name="resolve source", started=started, ended=started, outcome="succeeded")],
        log_uri="file:///tmp/logs/customization.log",
    )
    console = Console(file=io.StringIO(), width=200)
    console.print(summary(status, with_steps=True))
    text = console.file.getvalue()
    for expected in (
        "golden  PartiallySucceeded  12m 03s",
        "vhd: [quota] exceeded",
        "westeurope: Completed",
        "Resources left behind",
        "/sub/rg/vm",
        "resolve source",
        "file:///tmp/logs/customization.log",
    ):
        assert expected in text


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.9, "59s"), (65, "1m 05s"), (3 * 3600 + 120, "3h 02m")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_read_log_from_a_file_uri_and_offset(tmp_path: Path) -> None:
    log = tmp_path / "build one" / "customization.log"
    log.parent.mkdir()
    log.write_bytes(b"first\nsecond\n")
    uri = log.as_uri()

    assert await read_log(uri) == b"first\nsecond\n"
    assert await read_log(uri, 6) == b"second\n"
    assert await read_log(uri, 100) == b""
    with pytest.raises(FileNotFoundError):
        await read_log(sibling_log(uri, "validation.log"))


def test_sibling_log_keeps_the_folder_and_a_sas_query() -> None:
    uri = "https://acct.blob.core.windows.net/logs/b1/customization.log?sv=2024&sig=abc"
    assert (
        sibling_log(uri, "validation.log")
        == "https://acct.blob.core.windows.net/logs/b1/validation.log?sv=2024&sig=abc"
    )


async def test_log_tail_returns_complete_lines_once(tmp_path: Path) -> None:
    log = tmp_path / "customization.log"
    log.write_bytes(b"one\ntw")
    tail = LogTail()

    assert await tail.poll(log.as_uri()) == ["one"]
    with log.open("ab") as f:
        f.write(b"o\r\nprogress 10%\rprogress 100%\nthree")
    assert await tail.poll(log.as_uri()) == ["two", "progress 100%"]
    assert await tail.poll(log.as_uri()) == []
    assert await tail.poll((tmp_path / "not-yet.log").as_uri()) == []
