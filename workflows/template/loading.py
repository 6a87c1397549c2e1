"""The ways in: `parse_template` validates a template already read (in the workflow, too), `load_template`
reads and validates a template file with its ARM parameters file, and `template_json_schema` describes a
template for editors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workflows.template.arm import is_arm_wrapper, resolve_arm_wrapper
from workflows.template.errors import TemplateError, TemplateIssue, template_issues
from workflows.template.image_template import ImageTemplate


def parse_template(raw: dict, *, parameters: dict | None = None) -> ImageTemplate:
    """Validate an AIB template (plain, or an ARM deployment wrapper resolved with ``parameters``).

    Raises TemplateError listing every problem. Field names are matched by their JSON (camelCase) names
    only, as AIB does; Python code that builds models directly may still use snake_case names.
    """
    if is_arm_wrapper(raw):
        raw, _ = resolve_arm_wrapper(raw, parameters)
    try:
        return ImageTemplate.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as err:
        raise TemplateError(template_issues(err, raw)) from None


def _read_json(path: Path) -> Any:
    text = path.read_text(encoding="utf-8-sig")  # editors on Windows often write a BOM
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TemplateError(
            [
                TemplateIssue(
                    path="", message=f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}."
                )
            ]
        ) from None


def load_template(path: str | Path, parameters_path: str | Path | None = None) -> tuple[dict, str | None]:
    """Read and validate a template file; return the plain template dict (the build's input) and its name.

    An ARM deployment template is resolved with the parameters file. The name is the ARM resource's
    `name`, or the body's own `name` when a plain template carries one. Raises TemplateError for invalid
    JSON (with line and column) and for every problem in the template; OSError when a file cannot be read.
    """
    doc = _read_json(Path(path))
    parameters = _read_json(Path(parameters_path)) if parameters_path is not None else None
    if parameters is not None and not isinstance(parameters, dict):
        raise TemplateError([TemplateIssue(path="", message=f"{parameters_path}: parameters must be a JSON object.")])
    if is_arm_wrapper(doc):
        doc, name = resolve_arm_wrapper(doc, parameters)
    else:
        name = doc.get("name") if isinstance(doc, dict) and isinstance(doc.get("name"), str) else None
    parse_template(doc)
    return doc, name


def template_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of an image template by its JSON names, for editors and `kiln validate`."""
    schema = ImageTemplate.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
