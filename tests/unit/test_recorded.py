"""Models rebuilt from history without judging them again: equal to what was recorded, whatever rules say now."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic_core import InitErrorDetails, PydanticCustomError

from tests.fixtures import CORPUS
from workflows.models import BuildContext, DeleteOutputRequest, ValidatedTemplate
from workflows.recorded import rebuild
from workflows.template import (
    ImageTemplate,
    TemplateError,
    TemplateProperties,
    check_template,
    load_template,
    parse_template,
)

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
# Every corpus template, the fixture with every field, and a Windows one: each kind of source, step and target.
RECORDED = [*sorted(CORPUS.glob("*.json")), TEMPLATES / "good_every_field.json", TEMPLATES / "good_windows.json"]


def accepted(path: Path) -> ImageTemplate:
    body, _ = load_template(path, TEMPLATES / "arm_parameters.json")
    return parse_template(body)


@pytest.mark.parametrize("path", RECORDED, ids=[path.name for path in RECORDED])
def test_a_recorded_template_is_rebuilt_as_it_was_accepted(path: Path) -> None:
    template = accepted(path)
    recorded = json.loads(json.dumps(template.model_dump(mode="json")))  # as history holds it

    rebuilt = rebuild(ImageTemplate, recorded)

    assert rebuilt == template
    assert rebuilt.model_dump(mode="json") == recorded  # what the activities are given is unchanged too


def test_a_rule_added_since_does_not_refuse_a_recorded_template(monkeypatch: pytest.MonkeyPatch) -> None:
    template = accepted(CORPUS / "q0_helloImageTemplateLinux.json")
    recorded = template.model_dump(mode="json")

    def refuse_all(cls: type[TemplateProperties], data: dict) -> Iterator[InitErrorDetails]:
        yield InitErrorDetails(type=PydanticCustomError("rule", "Refused by a rule added later."), loc=(), input=data)

    monkeypatch.setattr(TemplateProperties, "_rules", classmethod(refuse_all))
    with pytest.raises(TemplateError):
        parse_template(recorded)
    assert rebuild(ImageTemplate, recorded) == template


def test_an_undo_request_is_rebuilt_with_its_distribution_target() -> None:
    target = accepted(CORPUS / "q1_helloImageTemplateforSIG.json").properties.distribute[0]
    request = DeleteOutputRequest(
        build=BuildContext(build_id="b-1", template_name="golden", location="westus2", cloud="azure"),
        target=target,
        index=0,
    )
    rebuilt = rebuild(DeleteOutputRequest, request.model_dump(mode="json"))
    assert rebuilt == request
    assert type(rebuilt.target) is type(target)


def test_a_union_member_no_model_names_is_refused() -> None:
    recorded = accepted(CORPUS / "q4_helloImageTemplateVHD.json").model_dump(mode="json")
    recorded["properties"]["distribute"][0]["type"] = "Tape"
    with pytest.raises(ValueError, match="Tape"):
        rebuild(ImageTemplate, recorded)


def test_a_validation_recorded_before_warnings_reads_as_one_without_warnings() -> None:
    template = accepted(CORPUS / "q0_helloImageTemplateLinux.json").model_dump(mode="json")
    assert ValidatedTemplate.model_validate(template) == ValidatedTemplate(template=template, warnings=[])


def test_a_validation_with_warnings_is_recorded_with_them() -> None:
    checked = check_template(json.loads((TEMPLATES / "warn_older_api.json").read_text()))
    recorded = ValidatedTemplate(template=checked.template.model_dump(mode="json"), warnings=checked.warnings)
    again = ValidatedTemplate.model_validate(json.loads(recorded.model_dump_json()))
    assert again == recorded
    assert [w.path for w in again.warnings] == [w.path for w in checked.warnings] != []
    assert rebuild(ImageTemplate, again.template) == checked.template
