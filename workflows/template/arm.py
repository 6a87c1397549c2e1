"""ARM deployment templates that wrap an image template: finding the imageTemplates resource, reading an
ARM parameters file (or a plain name-to-value object), and evaluating the ARM template language's
expressions in the resource's values and property names, reporting each that cannot be resolved at its path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from workflows.template.errors import TemplateError, TemplateIssue, format_path, shown

_IMAGE_TEMPLATE_TYPE = "microsoft.virtualmachineimages/imagetemplates"


class _ArmError(Exception):
    """An expression that cannot be evaluated; its text says why, and goes into the issue at its path."""


def is_arm_wrapper(doc: object) -> bool:
    """An ARM deployment template (with `resources`) rather than a plain image template body."""
    return isinstance(doc, dict) and ("resources" in doc or "deploymentTemplate" in str(doc.get("$schema", "")))


def _parameter_values(parameters: dict | None) -> dict[str, Any]:
    """Values from an ARM parameters file (`{"parameters": {"x": {"value": ...}}}`) or a plain `{"x": ...}`."""
    if not parameters:
        return {}
    inner = parameters.get("parameters")
    arm_file = isinstance(inner, dict) and (
        "$schema" in parameters
        or "contentVersion" in parameters
        or all(isinstance(v, dict) and "value" in v for v in inner.values())
    )
    if arm_file:
        return {k.lower(): v["value"] for k, v in inner.items() if isinstance(v, dict) and "value" in v}
    return {k.lower(): v for k, v in parameters.items()}


_TOKEN = re.compile(r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<number>-?\d+)|(?P<name>[A-Za-z_]\w*)|(?P<punct>[(),.\[\]]))")


def _concat(args: list[Any]) -> Any:
    """Arrays into one array, or values into one string (booleans written as ARM writes them)."""
    if args and all(isinstance(a, list) for a in args):
        return [item for a in args for item in a]
    if any(isinstance(a, (list, dict)) for a in args):
        raise _ArmError("concat() takes only strings, or only arrays")
    return "".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)


# The template functions that depend on their arguments alone, by their ARM names; a function added here
# is resolved, and named in the message for one that is not.
_FUNCTIONS: dict[str, Callable[[list[Any]], Any]] = {"concat": _concat}
_FUNCTIONS_BY_LOWER_NAME = {name.lower(): function for name, function in _FUNCTIONS.items()}  # ARM ignores case
_CALLS = [f"{name}()" for name in ("parameters", "variables", *_FUNCTIONS)]
_SUPPORTED = f"{', '.join(_CALLS[:-1])} and {_CALLS[-1]}"


class _ArmScope:
    """Evaluates the ARM template language as far as image templates use it.

    That is parameters(), variables() (the template's own declarations), the functions in _FUNCTIONS, and
    members of their values (`.name`, `[0]`), in values and in property names alike.
    """

    def __init__(self, doc: dict, parameters: dict | None) -> None:
        declared = doc.get("parameters")
        variables = doc.get("variables")
        self.declared = {k.lower(): v for k, v in declared.items()} if isinstance(declared, dict) else {}
        self.variables = {k.lower(): v for k, v in variables.items()} if isinstance(variables, dict) else {}
        self.given = _parameter_values(parameters)
        self.resolving: set[str] = set()

    def resolve(self, node: Any, loc: tuple[str | int, ...], issues: list[TemplateIssue] | None) -> Any:
        """`node` with every expression evaluated. Failures go to `issues`, or raise when it is None."""
        if isinstance(node, dict):
            return {self._key(k, loc, issues): self.resolve(v, (*loc, k), issues) for k, v in node.items()}
        if isinstance(node, list):
            return [self.resolve(v, (*loc, i), issues) for i, v in enumerate(node)]
        if not isinstance(node, str) or not node.startswith("[") or not node.endswith("]"):
            return node
        if node.startswith("[["):
            return node[1:]
        try:
            return self.evaluate(node[1:-1])
        except _ArmError as err:
            if issues is None:
                raise
            issues.append(TemplateIssue(path=format_path(loc), message=f"Cannot resolve {node}: {err}"))
            return node

    def _key(self, key: str, loc: tuple[str | int, ...], issues: list[TemplateIssue] | None) -> str:
        """ARM evaluates expressions in property names too (userAssignedIdentities keys often use one)."""
        resolved = self.resolve(key, loc, issues)
        if isinstance(resolved, str):
            return resolved
        why = f"a property name must be a string, not {shown(resolved)}"
        if issues is None:
            raise _ArmError(why)
        issues.append(TemplateIssue(path=format_path(loc), message=f"Cannot resolve {key}: {why}"))
        return key

    def evaluate(self, text: str) -> Any:
        tokens: list[tuple[str | None, str]] = []
        position = 0
        while text[position:].strip():
            match = _TOKEN.match(text, position)
            if not match:
                raise _ArmError(f"cannot read the expression at '{text[position:].strip()}'")
            tokens.append((match.lastgroup, match.group(match.lastgroup or 0)))
            position = match.end()
        value, rest = self._expression(tokens)
        if rest:
            raise _ArmError(f"unexpected '{rest[0][1]}' in the expression")
        return value

    def _expression(self, tokens: list[tuple[str | None, str]]) -> tuple[Any, list[tuple[str | None, str]]]:
        if not tokens:
            raise _ArmError("the expression is incomplete")
        (kind, text), rest = tokens[0], tokens[1:]
        if kind == "string":
            value: Any = text[1:-1].replace("''", "'")
        elif kind == "number":
            value = int(text)
        elif kind == "name" and rest[:1] == [("punct", "(")]:
            args, rest = self._arguments(rest[1:])
            value = self._call(text, args)
        else:
            raise _ArmError(f"unexpected '{text}' in the expression")
        while rest[:1] in ([("punct", ".")], [("punct", "[")]):
            if rest[0][1] == ".":
                if len(rest) < 2 or rest[1][0] != "name":
                    raise _ArmError("a property name must follow '.'")
                value, rest = self._member(value, rest[1][1]), rest[2:]
            else:
                index, rest = self._expression(rest[1:])
                if rest[:1] != [("punct", "]")]:
                    raise _ArmError("missing ']'")
                value, rest = self._member(value, index), rest[1:]
        return value, rest

    def _arguments(self, tokens: list[tuple[str | None, str]]) -> tuple[list[Any], list[tuple[str | None, str]]]:
        args: list[Any] = []
        if tokens[:1] == [("punct", ")")]:
            return args, tokens[1:]
        while True:
            value, tokens = self._expression(tokens)
            args.append(value)
            if tokens[:1] == [("punct", ")")]:
                return args, tokens[1:]
            if tokens[:1] != [("punct", ",")]:
                raise _ArmError("missing ')' or ','")
            tokens = tokens[1:]

    @staticmethod
    def _member(value: Any, key: Any) -> Any:
        if isinstance(value, dict) and isinstance(key, str):
            found = {k.lower(): v for k, v in value.items()}
            if key.lower() in found:
                return found[key.lower()]
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            return value[key]
        raise _ArmError(f"the value has no member {shown(key)}")

    def _call(self, function: str, args: list[Any]) -> Any:
        name = function.lower()
        if name in ("parameters", "variables"):
            if len(args) != 1 or not isinstance(args[0], str):
                raise _ArmError(f"{function}() takes one name")
            return self._parameter(args[0]) if name == "parameters" else self._variable(args[0])
        if name in _FUNCTIONS_BY_LOWER_NAME:
            return _FUNCTIONS_BY_LOWER_NAME[name](args)
        raise _ArmError(
            f"function '{function}' is not supported; kiln resolves {_SUPPORTED} (give the value as a parameter instead)"
        )

    def _parameter(self, name: str) -> Any:
        key = name.lower()
        if key not in self.declared:
            raise _ArmError(f"parameter '{name}' is not declared in the template's parameters")
        if key in self.given:
            return self.given[key]
        declared = self.declared[key]
        if isinstance(declared, dict) and "defaultValue" in declared:
            return self.resolve(declared["defaultValue"], (), None)
        raise _ArmError(
            f"parameter '{name}' has no value: give it in the parameters, or a defaultValue in the template"
        )

    def _variable(self, name: str) -> Any:
        key = name.lower()
        if key not in self.variables:
            raise _ArmError(f"variable '{name}' is not declared in the template's variables")
        if key in self.resolving:
            raise _ArmError(f"variable '{name}' refers to itself")
        self.resolving.add(key)
        try:
            return self.resolve(self.variables[key], (), None)
        finally:
            self.resolving.discard(key)


def resolve_arm_wrapper(doc: dict, parameters: dict | None = None) -> tuple[dict, str | None]:
    """The imageTemplates resource of an ARM deployment template, expressions resolved, and its name.

    `parameters` is an ARM parameters file (`{"parameters": {"x": {"value": ...}}}`) or a plain
    `{"x": value}`; a parameter's defaultValue applies when it is not given. Every expression that cannot
    be resolved is reported at once, at the path inside the resource where it occurs.
    """
    resources = doc.get("resources")
    if isinstance(resources, dict):  # languageVersion 2.0: resources keyed by symbolic name
        resources = list(resources.values())
    if not isinstance(resources, list):
        raise TemplateError(
            [TemplateIssue(path="resources", message="An ARM deployment template needs a 'resources' list.")]
        )
    found = [r for r in resources if isinstance(r, dict) and str(r.get("type", "")).lower() == _IMAGE_TEMPLATE_TYPE]
    if len(found) != 1:
        raise TemplateError(
            [
                TemplateIssue(
                    path="resources",
                    message=f"Expected exactly one Microsoft.VirtualMachineImages/imageTemplates resource; "
                    f"the ARM template has {len(found)}.",
                )
            ]
        )
    issues: list[TemplateIssue] = []
    body = _ArmScope(doc, parameters).resolve(found[0], (), issues)
    if issues:
        raise TemplateError(issues)
    name = body.get("name")
    return body, name if isinstance(name, str) else None
