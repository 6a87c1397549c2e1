"""Template problems as AIB words them: TemplateIssue (one problem at its AIB-style JSON path, such as
`properties.distribute[0].runOutputName`), TemplateError (every problem at once), and the wording of
pydantic's errors as AIB's, with pydantic's internals (union tags in locations, its own phrasing) left out.
"""

from __future__ import annotations

import json
import re
from typing import Any, get_args

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from workflows.camel import CamelModel
from workflows.template.base import BAD_VALUE, RULE, UNKNOWN_FIELD
from workflows.template.distribute import Distributor
from workflows.template.source import Source
from workflows.template.steps import Customizer, Validator


class TemplateIssue(CamelModel):
    """One problem: `path` is AIB-style (`properties.distribute[0].runOutputName`), "" for the whole file."""

    path: str
    message: str


class TemplateError(ValueError):
    """Every problem with a template at once, each naming its JSON path."""

    def __init__(self, issues: list[TemplateIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(f"Validation failed: '{_qualified(i.path)}': {i.message}" for i in issues))

    def __reduce__(self) -> tuple[type[TemplateError], tuple[list[TemplateIssue]]]:
        return type(self), (self.issues,)


def _qualified(path: str) -> str:
    if not path:
        return "ImageTemplate"
    if path.startswith("resources"):  # inside an ARM deployment template, not the image template itself
        return path
    return f"ImageTemplate{path}" if path.startswith("[") else f"ImageTemplate.{path}"


_IDENTIFIER = re.compile(r"[A-Za-z_$][\w$-]*")


def format_path(loc: tuple[str | int, ...]) -> str:
    """`('properties', 'customize', 2, 'inline', 0)` -> `properties.customize[2].inline[0]`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            path += f".{part}" if path else part
        else:
            path += f"['{part}']"
    return path


def shown(value: object) -> str:
    """A value as a message quotes it: strings in quotes, anything else as JSON, cut to 120 characters."""
    text = f"'{value}'" if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def json_loc(loc: tuple[str | int, ...], raw: object) -> tuple[str | int, ...]:
    """Drop the union tags pydantic puts in a location (`customize, 2, 'Shell', ...`): AIB paths have none."""
    kept: list[str | int] = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and part not in node and part == node.get("type"):
            continue
        kept.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(kept)


def _union_tags(union: Any) -> list[str]:
    return [get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(union)[0])]


_UNIONS = {
    "source": ("source", _union_tags(Source)),
    "customize": ("customizer", _union_tags(Customizer)),
    "inVMValidations": ("validator", _union_tags(Validator)),
    "distribute": ("distribution target", _union_tags(Distributor)),
}

_KINDS_OF_VALUE = {
    "string_type": "It must be a string.",
    "int_type": "It must be a whole number.",
    "int_parsing": "It must be a whole number.",
    "int_from_float": "It must be a whole number.",
    "bool_type": "It must be true or false.",
    "list_type": "It must be a list.",
    "dict_type": "It must be an object.",
    "model_type": "It must be an object.",
    "model_attributes_type": "It must be an object.",
    "string_too_short": "It must not be empty.",
}


def _issue(error: ErrorDetails, raw: object, prefix: tuple[str | int, ...]) -> TemplateIssue:
    """One pydantic error as AIB would word it, at its AIB-style path (under `prefix`)."""
    loc = json_loc(error["loc"], raw)
    kind, ctx, value = error["type"], error.get("ctx") or {}, error["input"]
    container = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind in ("union_tag_invalid", "union_tag_not_found") and container in _UNIONS:
        what, tags = _UNIONS[container]
        allowed = f"Allowed types: {', '.join(tags)}."
        if kind == "union_tag_not_found":
            return TemplateIssue(path=format_path((*prefix, *loc, "type")), message=f"Missing field 'type'. {allowed}")
        return TemplateIssue(
            path=format_path((*prefix, *loc, "type")),
            message=f"Unknown {what} type {shown(ctx.get('tag'))}. {allowed}",
        )
    path = format_path((*prefix, *loc))
    # The field named in the message: the last name with any indexes after it, e.g. `inline[1]`.
    last_name = max((i for i, p in enumerate(loc) if isinstance(p, str)), default=0)
    field = "".join(f"[{p}]" if isinstance(p, int) else p for p in loc[last_name:])
    if kind == "missing":
        return TemplateIssue(path=path, message=f"Missing field '{field}'.")
    if kind in (UNKNOWN_FIELD, RULE):
        return TemplateIssue(path=path, message=error["msg"])
    if not loc:
        return TemplateIssue(path=path, message="The template must be a JSON object.")
    if kind == BAD_VALUE:
        why = error["msg"]
    elif kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        why = f"Allowed values: {expected}."
        if isinstance(value, str) and f"'{value.lower()}'" in expected.lower():
            why += " Values are case-sensitive."
    elif kind == "greater_than_equal":
        why = f"It must be at least {ctx.get('ge')}."
    elif kind == "less_than_equal":
        why = f"It must be at most {ctx.get('le')}."
    elif kind == "too_short" and field in _UNIONS:
        what, tags = _UNIONS[field]
        why = f"It must list at least one {what} ({', '.join(tags)})."
    elif kind == "too_short":
        why = f"It must have at least {ctx.get('min_length')} item(s)."
    else:
        why = _KINDS_OF_VALUE.get(kind, error["msg"] + ".")
    return TemplateIssue(path=path, message=f"Field '{field}' has a bad value: {shown(value)}. {why}")


def template_issues(err: ValidationError, raw: object, prefix: tuple[str | int, ...] = ()) -> list[TemplateIssue]:
    """Every error of a template's validation as an AIB-worded issue, each once.

    Args:
        err: the validation's errors.
        raw: the input validated.
        prefix: where that input is in its file (`resources[1]` in an ARM deployment template), put before
            every path.
    """
    issues: list[TemplateIssue] = []
    for error in err.errors(include_url=False):
        issue = _issue(error, raw, prefix)
        if issue not in issues:
            issues.append(issue)
    return issues
