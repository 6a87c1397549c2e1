"""The ways in: `check_template` judges a template already read as AIB would (accepted, accepted with
warnings, or refused with every problem at its path), in the workflow too; `parse_template` is its verdict's
template alone; `check_template_file` and `load_template` read a template file with its ARM parameters file;
`template_json_schema` describes a template for editors.

How strict the judgement is depends on the template's `apiVersion` (see api_versions.py): from 2024-02-01
an unknown field or a field name in the wrong case is refused, as AIB refuses it; before, the name is read in
any case and an unknown field dropped, as AIB did then, each with a warning that says what 2024-02-01 would do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workflows.template.api_versions import (
    IDENTITY_REQUIRED_FROM,
    STRICT_FROM,
    ApiContext,
    api_version_of,
    is_before,
    is_strict,
)
from workflows.template.arm import DeploymentContext, is_arm_wrapper, read_arm_wrapper
from workflows.template.base import UNKNOWN_FIELD
from workflows.template.errors import TemplateError, TemplateIssue, format_path, json_loc, template_issues
from workflows.template.image_template import ImageTemplate
from workflows.template.json_text import parse_json


@dataclass(frozen=True)
class CheckedTemplate:
    """A template AIB would accept: the body as given (an ARM template's resource, resolved), its name (the
    resource's, or the body's own), the model a build reads, and what AIB would accept only with a warning."""

    body: dict
    name: str | None
    template: ImageTemplate
    warnings: list[TemplateIssue] = field(default_factory=list)


def _lenient(
    body: dict, errors: list[Any], version: str, path: tuple[str | int, ...]
) -> tuple[dict, list[TemplateIssue]]:
    """`body` read as an API version before 2024-02-01 reads it: each field of `errors` (unknown ones) renamed to
    the field its name matches in another case, or dropped; with a warning for each, at its path (under `path`)."""
    body = copy.deepcopy(body)
    warnings = []
    for error in errors:
        loc = json_loc(error["loc"], body)
        parent: Any = body
        for part in loc[:-1]:
            parent = parent[part]
        key, ctx = loc[-1], error.get("ctx") or {}
        if key not in parent:  # the same field reported twice
            continue
        since, same_name = ctx.get("since"), ctx.get("same_name")
        if since:
            message = (
                f"Field '{key}' came in API version {since}: API version {version} ignores it, and so does kiln. "
                f"Set apiVersion to {since} or later to use it."
            )
        elif same_name and same_name not in parent:
            parent[same_name] = parent[key]
            message = (
                f"Field '{key}' is read as '{same_name}': API version {version} matches field names in any case, "
                f"and so does kiln. From {STRICT_FROM} on, AIB refuses it (field names are case-sensitive)."
            )
        else:
            message = (
                f"{error['msg']} API version {version} ignores unknown fields, and so does kiln. "
                f"From {STRICT_FROM} on, AIB refuses it."
            )
        del parent[key]
        warnings.append(TemplateIssue(path=format_path((*path, *loc)), message=message))
    return body, warnings


def _judged(body: dict, version: str, path: tuple[str | int, ...]) -> tuple[ImageTemplate, list[TemplateIssue]]:
    """The model of `body` at API `version`, and the warnings of a lenient version's reading.

    Raises:
        TemplateError: every problem, each at its path (under `path`, where the body is in its file).
    """
    warnings: list[TemplateIssue] = []
    while True:
        try:
            model = ImageTemplate.model_validate(body, by_alias=True, by_name=False, context=ApiContext(version))
            return model, warnings
        except ValidationError as err:
            errors = err.errors(include_url=False)
            ignored = [] if is_strict(version) else [e for e in errors if e["type"] == UNKNOWN_FIELD]
            if not ignored:
                raise TemplateError(template_issues(err, body, path)) from None
            # Each round renames or drops at least one field; a renamed one is validated on the next.
            body, more = _lenient(body, ignored, version, path)
            warnings += more


def check_template(
    raw: object,
    *,
    parameters: dict | None = None,
    deployment: DeploymentContext | None = None,
    cloud: str | None = None,
) -> CheckedTemplate:
    """Judge an AIB template as AIB would: a plain body, or an ARM deployment template resolved with
    `parameters` and `deployment`.

    Args:
        raw: the template as read from JSON.
        parameters: the ARM template's parameters file, or a plain name-to-value object.
        deployment: where the ARM template is deployed (what `resourceGroup()` and `subscription()` read).
        cloud: the cloud the build runs on (`local`, `azure`), for the warnings only one cloud needs.

    Raises:
        TemplateError: every problem at once, each at its path (in an ARM template, from `resources[i]`).
    """
    path: tuple[str | int, ...] = ()
    warnings: list[TemplateIssue] = []
    body: Any
    if is_arm_wrapper(raw):
        wrapped = read_arm_wrapper(raw, parameters, deployment)
        body, name, path, warnings = wrapped.body, wrapped.name, wrapped.path, list(wrapped.warnings)
    else:
        body = raw  # not necessarily an object: validation says so if it is not
        name = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None
    version = api_version_of(body)
    template, lenient_warnings = _judged(body, version, path)
    warnings += lenient_warnings
    if cloud == "azure" and template.identity is None and not is_before(version, IDENTITY_REQUIRED_FROM):
        warnings.append(
            TemplateIssue(
                path=format_path((*path, "identity")),
                message=f"Missing field 'identity': AIB requires one from API version {IDENTITY_REQUIRED_FROM} on "
                "and refuses the template without it. kiln builds it on Azure as its worker's own identity.",
            )
        )
    return CheckedTemplate(body=body, name=name, template=template, warnings=warnings)


def parse_template(
    raw: object, *, parameters: dict | None = None, deployment: DeploymentContext | None = None
) -> ImageTemplate:
    """Validate an AIB template (plain, or an ARM deployment wrapper resolved with `parameters` and `deployment`).

    Raises TemplateError listing every problem. Field names are matched by their JSON (camelCase) names
    only, as AIB does; Python code that builds models directly may still use snake_case names.
    """
    return check_template(raw, parameters=parameters, deployment=deployment).template


def _read_json(path: Path, *, arm: bool) -> Any:
    """A template (`arm` False: comments only if it is an ARM deployment template) or parameters file."""
    text = path.read_text(encoding="utf-8-sig")  # editors on Windows often write a BOM
    return parse_json(text, source=str(path), comments_allowed=(lambda _: True) if arm else is_arm_wrapper)


def check_template_file(
    path: str | Path,
    parameters_path: str | Path | None = None,
    *,
    deployment: DeploymentContext | None = None,
    cloud: str | None = None,
) -> CheckedTemplate:
    """Read and judge a template file (see `check_template`); an ARM deployment template is resolved with the
    parameters file and `deployment`. ARM templates and parameters files may have comments, as ARM allows.

    Raises:
        TemplateError: invalid JSON (with line and column), and every problem in the template.
        OSError: a file cannot be read.
    """
    doc = _read_json(Path(path), arm=False)
    parameters = _read_json(Path(parameters_path), arm=True) if parameters_path is not None else None
    if parameters is not None and not isinstance(parameters, dict):
        raise TemplateError([TemplateIssue(path="", message=f"{parameters_path}: parameters must be a JSON object.")])
    return check_template(doc, parameters=parameters, deployment=deployment, cloud=cloud)


def load_template(
    path: str | Path, parameters_path: str | Path | None = None, *, deployment: DeploymentContext | None = None
) -> tuple[dict, str | None]:
    """Read and validate a template file; return the plain template dict (the build's input) and its name.

    The name is the ARM resource's `name`, or the body's own `name` when a plain template carries one. Raises
    TemplateError for invalid JSON (with line and column) and for every problem in the template; OSError when a
    file cannot be read.
    """
    checked = check_template_file(path, parameters_path, deployment=deployment)
    return checked.body, checked.name


def template_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of an image template by its JSON names, as AIB's newest API version has it,
    for editors and `kiln validate`."""
    schema = ImageTemplate.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
