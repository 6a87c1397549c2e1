"""Azure RBAC as ARM enforces it on every request: the action an operation needs on its own scope, and the
*linked* actions it needs on the resources its body references.

A principal is the bearer token a client sends; `ArmEmulator.roles` maps tokens to the role assigned to them (at
subscription scope), and any other token acts as an Owner, so a test sets things up as itself and runs kiln as
the identity `deploy/azure-role.json` describes. A missing action answers 403 `AuthorizationFailed`; an action
held on the scope but missing on a referenced resource answers 403 `LinkedAuthorizationFailed`, as ARM does for
a snapshot of a managed disk without `Microsoft.Compute/disks/beginGetAccess/action` on that disk
(Azure/OpenShift#186, and custom-role write-ups from live runs).

Where this is an assumption rather than sourced: a referenced resource not in `_LINKED` needs its type's `read`
(a VM's image, an image's snapshot or VM, a gallery version's managed image); polls of operation-status URLs are
not checked; data actions (blob traffic) are Azurite's business, not this module's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .protocol import ArmError, Request

if TYPE_CHECKING:
    from .server import ArmEmulator

_GROUPS = "Microsoft.Resources/subscriptions/resourceGroups"
_PLATFORM_IMAGES = "Microsoft.Compute/locations/publishers/artifacttypes/offers/skus/versions/read"
# (type of the resource written, type it references) -> the linked action ARM checks on the referenced resource;
# None for the writer matches any writer.
_LINKED: dict[tuple[str | None, str], str] = {
    ("microsoft.compute/snapshots", "microsoft.compute/disks"): "Microsoft.Compute/disks/beginGetAccess/action",
    (None, "microsoft.network/virtualnetworks/subnets"): "Microsoft.Network/virtualNetworks/subnets/join/action",
    (None, "microsoft.network/publicipaddresses"): "Microsoft.Network/publicIPAddresses/join/action",
    (None, "microsoft.network/networksecuritygroups"): "Microsoft.Network/networkSecurityGroups/join/action",
    (None, "microsoft.network/networkinterfaces"): "Microsoft.Network/networkInterfaces/join/action",
    (None, "microsoft.managedidentity/userassignedidentities"): (
        "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action"
    ),
}


@dataclass(frozen=True)
class Role:
    """A role definition's `Actions` and `NotActions` (wildcards `*`, compared without case)."""

    actions: tuple[str, ...]
    not_actions: tuple[str, ...] = ()

    @classmethod
    def from_file(cls, path: Path) -> Role:
        """The role in an Azure role definition file (what `az role definition create` takes)."""
        definition = json.loads(path.read_text())
        return cls(tuple(definition.get("Actions") or ()), tuple(definition.get("NotActions") or ()))

    def allows(self, action: str) -> bool:
        return any(_matches(p, action) for p in self.actions) and not any(_matches(p, action) for p in self.not_actions)


OWNER = Role(("*",))


def _matches(pattern: str, action: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), action, re.IGNORECASE) is not None


@dataclass(frozen=True)
class Check:
    """What one request needs: `action` on `scope`, and each linked action on its linked scope."""

    action: str
    scope: str
    linked: tuple[tuple[str, str], ...] = ()


def authorize(arm: ArmEmulator, req: Request, sub: str, path: str) -> None:
    """Refuses the request (403) unless its principal's role holds what it needs.

    Raises:
        ArmError: `AuthorizationFailed` or `LinkedAuthorizationFailed`.
    """
    principal = (req.authorization or "").removeprefix("Bearer ").strip()
    role = arm.roles.get(principal, OWNER)
    check = required(arm, req, sub, path)
    if check is None:
        return
    if not role.allows(check.action):
        raise ArmError(
            403,
            "AuthorizationFailed",
            f"The client '{principal}' with object id '{principal}' does not have authorization to perform action "
            f"'{check.action}' over scope '{check.scope}' or the scope is invalid. If access was recently granted, "
            "please refresh your credentials.",
        )
    missing = [(action, scope) for action, scope in check.linked if not role.allows(action)]
    if missing:
        raise ArmError(
            403,
            "LinkedAuthorizationFailed",
            f"The client '{principal}' with object id '{principal}' has permission to perform action "
            f"'{check.action}' on scope '{check.scope}'; however, it does not have permission to perform action(s) "
            f"'{','.join(a for a, _ in missing)}' on the linked scope(s) '{','.join(s for _, s in missing)}' "
            "(respectively) or the linked scope(s) are invalid.",
        )


def required(arm: ArmEmulator, req: Request, sub: str, path: str) -> Check | None:
    """The check a request to `path` (after `/subscriptions/{sub}/`) needs; None for what RBAC does not cover."""
    scope = f"/subscriptions/{sub}"
    verb = {"GET": "read", "HEAD": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}.get(req.method)
    segs = path.split("/")
    lowered = [s.lower() for s in segs]
    if lowered == ["resourcegroups"]:
        return Check(f"{_GROUPS}/read", scope)
    if lowered == ["resources"]:
        return Check("Microsoft.Resources/subscriptions/resources/read", scope)
    if len(segs) >= 2 and lowered[0] == "resourcegroups":
        scope = f"{scope}/resourceGroups/{segs[1]}"
        if len(segs) == 2:
            return Check(f"{_GROUPS}/{verb}", scope) if verb else None
        if lowered[2:] == ["resources"]:
            return Check(f"{_GROUPS}/resources/read", scope)
        if len(segs) >= 5 and lowered[2] == "providers":
            return _resource_check(arm, req, scope, segs[3], segs[4:], verb)
    if len(segs) >= 3 and lowered[0] == "providers":
        if lowered[1] == "microsoft.compute" and "publishers" in lowered:
            return Check(_PLATFORM_IMAGES, scope)
        return Check(f"{_type_name(arm, segs[1], segs[2:3])}/read", scope)
    return None


def _resource_check(
    arm: ArmEmulator, req: Request, group_scope: str, ns: str, parts: list[str], verb: str | None
) -> Check | None:
    """A resource (type/name pairs), a listing of one type, or an action on a resource."""
    if len(parts) % 2 == 0:  # a resource
        type_name = _type_name(arm, ns, parts[0::2])
        scope = f"{group_scope}/providers/{ns}/{'/'.join(parts)}"
        if verb is None:
            return None
        linked = _linked(type_name, req.json()) if verb == "write" and req.body else ()
        return Check(f"{type_name}/{verb}", scope, tuple(linked))
    if len(parts) == 1:  # a listing of one type in the group
        return Check(f"{_type_name(arm, ns, parts)}/read", group_scope)
    owner = _type_name(arm, ns, parts[:-1:2])
    scope = f"{group_scope}/providers/{ns}/{'/'.join(parts[:-1])}"
    child = arm.types.get(f"{owner}/{parts[-1]}".lower())
    if child is not None:  # a listing of a child type under one resource
        return Check(f"{child.name}/read", scope)
    action = arm.types[owner.lower()].actions.get(parts[-1].lower()) if owner.lower() in arm.types else None
    if action is not None and action.method == "GET":  # a view such as instanceView
        return Check(f"{owner}/{parts[-1]}/read", scope)
    return Check(f"{owner}/{parts[-1]}/action", scope)


def _type_name(arm: ArmEmulator, ns: str, types: list[str]) -> str:
    """The type as its provider registers it (ARM reports actions in that case), else as the path spells it."""
    name = "/".join([ns, *types])
    spec = arm.types.get(name.lower())
    return spec.name if spec is not None else name


def _linked(writer: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """The linked actions a PUT body needs: one per resource it references."""
    refs = _references(body.get("properties") or {})
    refs += list(((body.get("identity") or {}).get("userAssignedIdentities") or {}).keys())
    checks = []
    for ref in refs:
        referenced = _type_of_id(ref)
        action = _LINKED.get((writer.lower(), referenced.lower())) or _LINKED.get((None, referenced.lower()))
        checks.append((action or f"{referenced}/read", ref))
    return checks


def _references(value: Any) -> list[str]:
    """Every ARM resource id a body names (values of keys named id or ending in Id)."""
    if isinstance(value, list):
        return [i for v in value for i in _references(v)]
    if not isinstance(value, dict):
        return []
    found = []
    for key, item in value.items():
        if (key == "id" or key.endswith("Id")) and isinstance(item, str) and "/providers/" in item.lower():
            found.append(item)
        else:
            found += _references(item)
    return found


def _type_of_id(resource_id: str) -> str:
    """`Microsoft.Network/virtualNetworks/subnets` from a subnet's id, and so on."""
    after = re.split("/providers/", resource_id, maxsplit=1, flags=re.IGNORECASE)[-1].split("/")
    return "/".join([after[0], *after[1::2]])
