"""WindowsRestart's restartTimeout, read as Packer reads it (a Go duration), and refused clearly when it is not one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from workflows.template import TemplateError, WindowsRestartCustomizer, check_template
from workflows.template.formats import duration_seconds

GOOD_WINDOWS = json.loads((Path(__file__).parents[1] / "fixtures" / "templates" / "good_windows.json").read_text())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("2m30s", 150), ("500ms", 0.5)],
)
def test_a_restart_timeout_is_a_go_duration(text: str, seconds: float) -> None:
    assert duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5 minutes", "5", "1d", "m5", "5m30", "-5m", "", "<timeout>"])
def test_a_restart_timeout_that_is_no_duration_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        duration_seconds(text)
    message = str(refused.value)
    assert message.startswith(f"Field 'restartTimeout' has a bad value: '{text}'.")
    assert "such as 5m, 30m, 1h30m or 2h" in message


def with_restart_timeout(value: str) -> dict:
    template = copy.deepcopy(GOOD_WINDOWS)
    template["properties"]["customize"][1]["restartTimeout"] = value
    return template


@pytest.mark.parametrize("text", ["5m", "2h", "1h30m"])
def test_a_template_keeps_its_restart_timeout(text: str) -> None:
    restart = check_template(with_restart_timeout(text)).template.properties.customize[1]
    assert isinstance(restart, WindowsRestartCustomizer)
    assert restart.restart_timeout == text and duration_seconds(restart.restart_timeout) > 0


def test_a_template_with_a_bad_restart_timeout_is_refused_before_the_build() -> None:
    with pytest.raises(TemplateError) as refused:
        check_template(with_restart_timeout("1d"))
    [issue] = refused.value.issues
    assert issue.path == "properties.customize[1].restartTimeout"
    assert "'1d'" in issue.message and "1h30m" in issue.message
