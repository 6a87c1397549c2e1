"""ARM deployment templates that wrap an image template, read as ARM reads them: the imageTemplates resource
that gets deployed (its resource-level names in any case; `condition`, `copy`, `dependsOn` and the rest of what
ARM itself consumes taken out of the body), an ARM parameters file (or a plain name-to-value object), and the
ARM template language's expressions in the resource's values and property names, each that cannot be
resolved reported at its path in the file (`resources[1].properties...`).

Expressions are parsed into a tree before they are evaluated, so `if()` evaluates only the branch it takes, as
ARM does. `resourceGroup()`, `subscription()`, `resourceId()` and `subscriptionResourceId()` read the
deployment's context (`DeploymentContext`: kiln's `--subscription`, `--resource-group`, `--location`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from workflows.template.arm_functions import FUNCTIONS, ArmError
from workflows.template.errors import TemplateError, TemplateIssue, format_path, shown

_IMAGE_TEMPLATE_TYPE = "microsoft.virtualmachineimages/imagetemplates"
# A resource's own properties, which ARM matches in any case; others pass to the body as written.
_RESOURCE_PROPERTIES = {
    name.lower(): name
    for name in (
        "type",
        "apiVersion",
        "name",
        "location",
        "tags",
        "identity",
        "properties",
        "dependsOn",
        "condition",
        "copy",
        "comments",
        "metadata",
        "scope",
        "existing",
        "resources",
    )
}
# What ARM reads itself and never sends to the resource provider: never evaluated into the body.
_ARM_ONLY = ("dependsOn", "condition", "copy", "comments", "metadata", "scope", "existing", "resources")


@dataclass(frozen=True)
class DeploymentContext:
    """Where an ARM deployment template is deployed: what `resourceGroup()`, `subscription()` and
    `resourceId()` read. Each part is optional; an expression that needs a missing one says which."""

    subscription_id: str | None = None
    resource_group: str | None = None
    location: str | None = None


@dataclass(frozen=True)
class WrappedTemplate:
    """The image template an ARM deployment template deploys: its body (expressions resolved), its name, where
    the resource is in the file, and what kiln leaves out that ARM would deploy beside it."""

    body: dict
    name: str | None
    path: tuple[str | int, ...]
    warnings: list[TemplateIssue] = field(default_factory=list)


def is_arm_wrapper(doc: object) -> TypeGuard[dict]:
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

Token = tuple[str | None, str]
# An expression's tree: ("value", v), ("call", name, [args]) or ("member", target, key).
Node = tuple[Any, ...]

# Functions of the deployment (its copy loop and where it is deployed) by ARM's names, with the methods of
# _ArmScope that evaluate them; parameters(), variables() and if() are evaluated by _ArmScope.evaluate itself.
_SCOPE_FUNCTIONS = {
    "copyIndex": "_copy_index",
    "resourceGroup": "_resource_group",
    "subscription": "_subscription",
    "resourceId": "_resource_id",
    "subscriptionResourceId": "_subscription_resource_id",
}
_SCOPE_FUNCTIONS_BY_LOWER_NAME = {name.lower(): method for name, method in _SCOPE_FUNCTIONS.items()}
_SUPPORTED = ", ".join(f"{name}()" for name in ("parameters", "variables", "if", *_SCOPE_FUNCTIONS, *FUNCTIONS))
_FUNCTIONS_BY_LOWER_NAME = {name.lower(): function for name, function in FUNCTIONS.items()}  # ARM ignores case


def parse_expression(text: str) -> Node:
    """The tree of one expression (the text between `[` and `]`).

    Raises:
        ArmError: the text is not an expression, saying where.
    """
    tokens: list[Token] = []
    position = 0
    while text[position:].strip():
        match = _TOKEN.match(text, position)
        if not match:
            raise ArmError(f"cannot read the expression at '{text[position:].strip()}'")
        tokens.append((match.lastgroup, match.group(match.lastgroup or 0)))
        position = match.end()
    node, rest = _expression(tokens)
    if rest:
        raise ArmError(f"unexpected '{rest[0][1]}' in the expression")
    return node


def _expression(tokens: list[Token]) -> tuple[Node, list[Token]]:
    if not tokens:
        raise ArmError("the expression is incomplete")
    (kind, text), rest = tokens[0], tokens[1:]
    node: Node
    if kind == "string":
        node = ("value", text[1:-1].replace("''", "'"))
    elif kind == "number":
        node = ("value", int(text))
    elif kind == "name" and rest[:1] == [("punct", "(")]:
        args, rest = _arguments(rest[1:])
        node = ("call", text, args)
    else:
        raise ArmError(f"unexpected '{text}' in the expression")
    while rest[:1] in ([("punct", ".")], [("punct", "[")]):
        if rest[0][1] == ".":
            if len(rest) < 2 or rest[1][0] != "name":
                raise ArmError("a property name must follow '.'")
            node, rest = ("member", node, ("value", rest[1][1])), rest[2:]
        else:
            index, rest = _expression(rest[1:])
            if rest[:1] != [("punct", "]")]:
                raise ArmError("missing ']'")
            node, rest = ("member", node, index), rest[1:]
    return node, rest


def _arguments(tokens: list[Token]) -> tuple[list[Node], list[Token]]:
    args: list[Node] = []
    if tokens[:1] == [("punct", ")")]:
        return args, tokens[1:]
    while True:
        node, tokens = _expression(tokens)
        args.append(node)
        if tokens[:1] == [("punct", ")")]:
            return args, tokens[1:]
        if tokens[:1] != [("punct", ",")]:
            raise ArmError("missing ')' or ','")
        tokens = tokens[1:]


class _Partial(dict):
    """What `resourceGroup()` or `subscription()` returns: the members the deployment context gives. Asking for
    another says which option would give it."""

    def __init__(self, function: str, known: dict[str, Any], needs: dict[str, str]) -> None:
        super().__init__(known)
        self.function = function
        self.needs = needs

    def missing(self, key: str) -> str:
        need = {k.lower(): v for k, v in self.needs.items()}.get(key.lower())
        if need:
            return f"{self.function}().{key} needs {need}"
        return f"kiln knows only {', '.join(sorted({*self, *self.needs}))} of {self.function}()"


def _member(value: Any, key: Any) -> Any:
    if isinstance(value, dict) and isinstance(key, str):
        found = {k.lower(): v for k, v in value.items()}
        if key.lower() in found:
            return found[key.lower()]
        if isinstance(value, _Partial):
            raise ArmError(value.missing(key))
    elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
        return value[key]
    raise ArmError(f"the value has no member {shown(key)}")


class _ArmScope:
    """Evaluates the ARM template language as far as image templates use it: parameters(), variables() (the
    template's own declarations), the functions of the deployment and those in FUNCTIONS, and members of their
    values (`.name`, `[0]`), in values and in property names alike."""

    def __init__(self, doc: dict, parameters: dict | None, deployment: DeploymentContext) -> None:
        declared = doc.get("parameters")
        variables = doc.get("variables")
        self.declared = {k.lower(): v for k, v in declared.items()} if isinstance(declared, dict) else {}
        self.variables = {k.lower(): v for k, v in variables.items()} if isinstance(variables, dict) else {}
        self.given = _parameter_values(parameters)
        self.deployment = deployment
        self.resolving: set[str] = set()
        # The copy loop the resource is deployed in: its name and this instance's index.
        self.copy: tuple[str | None, int] | None = None

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
            return self.evaluate(parse_expression(node[1:-1]))
        except ArmError as err:
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
            raise ArmError(why)
        issues.append(TemplateIssue(path=format_path(loc), message=f"Cannot resolve {key}: {why}"))
        return key

    def evaluate(self, node: Node) -> Any:
        if node[0] == "value":
            return node[1]
        if node[0] == "member":
            return _member(self.evaluate(node[1]), self.evaluate(node[2]))
        function, arguments = node[1], node[2]
        name = function.lower()
        if name == "if":  # only the branch taken is evaluated, as in ARM
            if len(arguments) != 3:
                raise ArmError("if() takes a condition, a value when true and a value when false")
            condition = self.evaluate(arguments[0])
            if not isinstance(condition, bool):
                raise ArmError(f"if() needs a condition of true or false, not {shown(condition)}")
            return self.evaluate(arguments[1] if condition else arguments[2])
        args = [self.evaluate(a) for a in arguments]
        if name in ("parameters", "variables"):
            if len(args) != 1 or not isinstance(args[0], str):
                raise ArmError(f"{function}() takes one name")
            return self._parameter(args[0]) if name == "parameters" else self._variable(args[0])
        if name in _SCOPE_FUNCTIONS_BY_LOWER_NAME:
            return getattr(self, _SCOPE_FUNCTIONS_BY_LOWER_NAME[name])(args)
        if name in _FUNCTIONS_BY_LOWER_NAME:
            return _FUNCTIONS_BY_LOWER_NAME[name](args)
        raise ArmError(
            f"function '{function}' is not supported; kiln resolves {_SUPPORTED} (give the value as a parameter instead)"
        )

    def _parameter(self, name: str) -> Any:
        key = name.lower()
        if key not in self.declared:
            raise ArmError(f"parameter '{name}' is not declared in the template's parameters")
        if key in self.given:
            return self.given[key]
        declared = self.declared[key]
        if isinstance(declared, dict) and "defaultValue" in declared:
            try:
                return self.resolve(declared["defaultValue"], (), None)
            except ArmError as err:
                raise ArmError(
                    f"parameter '{name}' has no value, and its defaultValue cannot be resolved: {err}"
                ) from None
        raise ArmError(f"parameter '{name}' has no value: give it in the parameters, or a defaultValue in the template")

    def _variable(self, name: str) -> Any:
        key = name.lower()
        if key not in self.variables:
            raise ArmError(f"variable '{name}' is not declared in the template's variables")
        if key in self.resolving:
            raise ArmError(f"variable '{name}' refers to itself")
        self.resolving.add(key)
        try:
            return self.resolve(self.variables[key], (), None)
        finally:
            self.resolving.discard(key)

    def _copy_index(self, args: list[Any]) -> int:
        """copyIndex([loopName], [offset]): the index of this instance of the resource's copy loop."""
        rest = list(args)
        loop = rest.pop(0) if rest and isinstance(rest[0], str) else None
        offset = rest.pop(0) if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool) else 0
        if rest:
            raise ArmError("copyIndex() takes a loop name, an offset, or both")
        if self.copy is None:
            raise ArmError("copyIndex() is used outside a copy loop")
        name, index = self.copy
        if loop is not None and (name or "").lower() != loop.lower():
            raise ArmError(f"copyIndex(): the resource's copy loop is not named '{loop}'")
        return index + offset

    def _needs(self, function: str, *parts: str) -> list[str]:
        """The deployment context's `parts` (DeploymentContext fields), all of them, or an error naming each one
        missing and the option that gives it."""
        options = {"subscription_id": "--subscription", "resource_group": "--resource-group", "location": "--location"}
        missing = [part for part in parts if not getattr(self.deployment, part)]
        if missing:
            what = " and ".join(part.removesuffix("_id").replace("_", " ") for part in missing)
            give = " and ".join(options[part] for part in missing)
            raise ArmError(f"{function} needs the deployment's {what}: give {give}")
        return [getattr(self.deployment, part) for part in parts]

    def _resource_group(self, args: list[Any]) -> dict[str, Any]:
        if args:
            raise ArmError("resourceGroup() takes no arguments")
        context = self.deployment
        known: dict[str, Any] = {"type": "Microsoft.Resources/resourceGroups"}
        needs = {}
        if context.resource_group:
            known["name"] = context.resource_group
        else:
            needs["name"] = "the deployment's resource group: give --resource-group"
        if context.location:
            known["location"] = context.location
        else:
            needs["location"] = "the resource group's region: give --location"
        if context.subscription_id and context.resource_group:
            known["id"] = f"/subscriptions/{context.subscription_id}/resourceGroups/{context.resource_group}"
        else:
            needs["id"] = "the deployment's subscription and resource group: give --subscription and --resource-group"
        return _Partial("resourceGroup", known, needs)

    def _subscription(self, args: list[Any]) -> dict[str, Any]:
        if args:
            raise ArmError("subscription() takes no arguments")
        subscription = self.deployment.subscription_id
        if subscription:
            return _Partial(
                "subscription", {"id": f"/subscriptions/{subscription}", "subscriptionId": subscription}, {}
            )
        need = "the deployment's subscription: give --subscription"
        return _Partial("subscription", {}, {"id": need, "subscriptionId": need})

    @staticmethod
    def _provider_path(function: str, args: list[Any]) -> tuple[list[str], str]:
        """The scope arguments before the resource type (the first with a '/'), and `/providers/<type>/<name>...`
        made of the type and the names after it."""
        if not args or not all(isinstance(a, str) for a in args):
            raise ArmError(f"{function}() takes strings: the resource type and its names")
        at = next((i for i, a in enumerate(args) if "/" in a), None)
        if at is None:
            raise ArmError(f"{function}() needs a resource type such as 'Microsoft.Compute/galleries'")
        resource_type, names = args[at], args[at + 1 :]
        namespace, _, types = resource_type.partition("/")
        segments = types.split("/")
        if len(names) != len(segments):
            raise ArmError(f"{function}(): the type '{resource_type}' needs {len(segments)} name(s), not {len(names)}")
        path = "/".join(f"{t}/{n}" for t, n in zip(segments, names, strict=True))
        return args[:at], f"/providers/{namespace}/{path}"

    def _resource_id(self, args: list[Any]) -> str:
        """resourceId([subscriptionId], [resourceGroupName], resourceType, name, ...): a resource group's resource."""
        scope, provider_path = self._provider_path("resourceId", args)
        if len(scope) > 2:
            raise ArmError("resourceId() takes at most a subscription and a resource group before the resource type")
        parts = ("subscription_id", "resource_group")[: 2 - len(scope)]
        subscription, group = [*self._needs("resourceId()", *parts), *scope]
        return f"/subscriptions/{subscription}/resourceGroups/{group}{provider_path}"

    def _subscription_resource_id(self, args: list[Any]) -> str:
        """subscriptionResourceId([subscriptionId], resourceType, name, ...): a subscription's own resource."""
        scope, provider_path = self._provider_path("subscriptionResourceId", args)
        if len(scope) > 1:
            raise ArmError("subscriptionResourceId() takes at most a subscription before the resource type")
        [subscription] = scope or self._needs("subscriptionResourceId()", "subscription_id")
        return f"/subscriptions/{subscription}{provider_path}"


def _resource_level(resource: dict) -> dict:
    """A resource with its own properties named as ARM names them (ARM matches them in any case)."""
    return {_RESOURCE_PROPERTIES.get(k.lower(), k) if isinstance(k, str) else k: v for k, v in resource.items()}


def _instances(
    scope: _ArmScope, resource: dict, loc: tuple[str | int, ...], issues: list[TemplateIssue]
) -> tuple[int, str | None]:
    """How many times ARM deploys `resource` (its `condition` and `copy` count), and its copy loop's name."""
    if resource.get("existing") is True:  # a reference to a resource deployed elsewhere
        return 0, None
    if "condition" in resource:
        reported = len(issues)
        condition = scope.resolve(resource["condition"], (*loc, "condition"), issues)
        if len(issues) == reported and not isinstance(condition, bool):
            message = f"A condition must be true or false, not {shown(condition)}."
            issues.append(TemplateIssue(path=format_path((*loc, "condition")), message=message))
        if condition is not True:
            return 0, None
    copy = resource.get("copy")
    if copy is None:
        return 1, None
    if not isinstance(copy, dict):
        issues.append(TemplateIssue(path=format_path((*loc, "copy")), message="A copy loop must be an object."))
        return 0, None
    reported = len(issues)
    count = scope.resolve(copy.get("count"), (*loc, "copy", "count"), issues)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        if len(issues) == reported:
            message = f"A copy count must be a whole number of 0 or more, not {shown(count)}."
            issues.append(TemplateIssue(path=format_path((*loc, "copy", "count")), message=message))
        return 0, None
    name = copy.get("name")
    return count, name if isinstance(name, str) else None


def read_arm_wrapper(
    doc: dict, parameters: dict | None = None, deployment: DeploymentContext | None = None
) -> WrappedTemplate:
    """The imageTemplates resource an ARM deployment template deploys, as ARM would send it to AIB.

    Args:
        doc: the deployment template.
        parameters: an ARM parameters file (`{"parameters": {"x": {"value": ...}}}`) or a plain `{"x": value}`;
            a parameter's defaultValue applies when it is not given.
        deployment: where the template is deployed, for the functions that read it.

    Raises:
        TemplateError: every expression that cannot be resolved, at its path in the file; or not exactly one
            imageTemplates resource deployed.
    """
    resources = doc.get("resources")
    if isinstance(resources, dict):  # languageVersion 2.0: resources keyed by symbolic name
        located = [(("resources", key), r) for key, r in resources.items()]
    elif isinstance(resources, list):
        located = [(("resources", i), r) for i, r in enumerate(resources)]
    else:
        raise TemplateError(
            [TemplateIssue(path="resources", message="An ARM deployment template needs a 'resources' list.")]
        )
    scope = _ArmScope(doc, parameters, deployment or DeploymentContext())
    issues: list[TemplateIssue] = []
    deployed: list[tuple[tuple[str | int, ...], dict, str | None]] = []
    count = 0
    for loc, resource in located:
        if not isinstance(resource, dict):
            continue
        resource = _resource_level(resource)
        if str(resource.get("type", "")).lower() != _IMAGE_TEMPLATE_TYPE:
            continue
        instances, loop = _instances(scope, resource, loc, issues)
        count += instances
        if instances:
            deployed.append((loc, resource, loop))
    if issues:
        raise TemplateError(issues)
    if count != 1:
        raise TemplateError(
            [
                TemplateIssue(
                    path="resources",
                    message=f"Expected exactly one Microsoft.VirtualMachineImages/imageTemplates resource; "
                    f"the ARM template has {count}.",
                )
            ]
        )
    loc, resource, loop = deployed[0]
    scope.copy = (loop, 0) if "copy" in resource else None
    warnings = []
    if resource.get("resources"):
        warnings.append(
            TemplateIssue(
                path=format_path((*loc, "resources")),
                message="kiln builds the image template alone: its child resources (such as triggers) are not made.",
            )
        )
    sent = {k: v for k, v in resource.items() if k not in _ARM_ONLY}
    body = scope.resolve(sent, loc, issues)
    if issues:
        raise TemplateError(issues)
    name = body.get("name")
    return WrappedTemplate(body=body, name=name if isinstance(name, str) else None, path=loc, warnings=warnings)


def resolve_arm_wrapper(
    doc: dict, parameters: dict | None = None, deployment: DeploymentContext | None = None
) -> tuple[dict, str | None]:
    """The imageTemplates resource of an ARM deployment template, expressions resolved, and its name (see
    `read_arm_wrapper`)."""
    wrapped = read_arm_wrapper(doc, parameters, deployment)
    return wrapped.body, wrapped.name
