"""The resource store: every resource by its case-insensitive ARM id, the resource groups that hold them, the ids
they reference, and selection by place, type and tag for listings.

The store remembers when each resource appeared and, for a while, the ones removed: ARM serves the generic
listings (`/resources`, a group's `/resources`) from a regional cache that runs behind, so resources made a moment
ago appear late and deleted ones linger (azure-rest-api-specs#21221, #28600; azure-sdk-for-python#22737). A
listing with a `lag` shows the store as it was that many seconds ago.

The store takes no lock of its own: whatever changes it or walks over it holds the emulator's lock
(`ArmEmulator.lock`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .protocol import ArmError, region_name

GROUP_TYPE = "Microsoft.Resources/resourceGroups"


@dataclass
class Resource:
    """One stored resource: what GET shows (envelope and properties) and what only the emulator sees (`state`)."""

    id: str
    type: str
    envelope: dict[str, Any]
    properties: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)  # emulator-only: power state, guest, operation, ...

    @property
    def key(self) -> str:
        return self.id.lower()

    @property
    def name(self) -> str:
        return self.id.rsplit("/", 1)[1]


class Store:
    """Resources (resource groups included) keyed by lower-cased id, since ARM ids are case-insensitive."""

    def __init__(self) -> None:
        self._by_key: dict[str, Resource] = {}
        self._since: dict[str, float] = {}  # when each resource appeared (monotonic seconds)
        self._gone: dict[str, tuple[Resource, float]] = {}  # removed resources and when, for lagged listings

    def __iter__(self) -> Iterator[Resource]:
        return iter(self._by_key.values())

    def __contains__(self, rid: str) -> bool:
        return rid.lower() in self._by_key

    def __getitem__(self, rid: str) -> Resource:
        """For ids a request has already been checked to reference; a missing one is an emulator bug."""
        return self._by_key[rid.lower()]

    def find(self, rid: str) -> Resource | None:
        """The resource, or None: for callers to which a missing one is not an error."""
        return self._by_key.get(rid.lower())

    def get(self, rid: str) -> Resource:
        """The resource, or ARM's 404 ResourceNotFound naming its type, name and group."""
        res = self.find(rid)
        if res is None:
            parts = rid.split("/")
            group = parts[4]
            kind = "/".join(parts[6:7] + parts[7::2])
            name = "/".join(parts[8::2])
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource '{kind}/{name}' under resource group '{group}' was not found. "
                "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
            )
        return res

    def add(self, res: Resource) -> None:
        """Stores a resource, replacing the one with its id (a PUT that updates)."""
        if res.key not in self._by_key:
            self._since[res.key] = time.monotonic()
            self._gone.pop(res.key, None)
        self._by_key[res.key] = res

    def discard(self, rid: str) -> None:
        """Takes out the resource with this id, if there is one, and nothing under it."""
        res = self._by_key.pop(rid.lower(), None)
        if res is not None:
            self._gone[res.key] = (res, time.monotonic())

    def remove_tree(self, res: Resource) -> list[Resource]:
        """Takes out a resource and everything under its id (a group's resources, a VNet's subnets)."""
        keys = [k for k in self._by_key if k == res.key or k.startswith(res.key + "/")]
        removed = [self._by_key.pop(k) for k in keys]
        for gone in removed:
            self._gone[gone.key] = (gone, time.monotonic())
        return removed

    # ----------------------------------------------------------------- resource groups

    def group_id(self, sub: str, group: str) -> str:
        """A group's id as it was created (ids keep the case of their first PUT)."""
        default = f"/subscriptions/{sub}/resourceGroups/{group}"
        existing = self.find(default)
        return existing.id if existing else default

    def require_group(self, sub: str, group: str) -> Resource:
        res = self.find(f"/subscriptions/{sub}/resourcegroups/{group}")
        if res is None:
            raise group_not_found(group)
        return res

    def region(self, res: Resource) -> str:
        """Where a resource is: its own location, else its group's (untracked resources have none)."""
        location = res.envelope.get("location")
        if not location:
            group = self.find("/".join(res.key.split("/")[:5]))
            location = group.envelope.get("location") if group else "global"
        return region_name(str(location))

    # ----------------------------------------------------------------- references

    def check_refs(self, props: dict[str, Any]) -> list[Resource]:
        """Resolves every ARM id a request references; a dangling one fails as in ARM."""
        found = []
        for ref in _ids_in(props):
            target = self.find(ref)
            if target is None:
                raise ArmError(
                    400, "InvalidResourceReference", f"Resource {ref} referenced by the request was not found."
                )
            found.append(target)
        return found

    def referrer(self, res: Resource, type_name: str) -> Resource | None:
        """The first resource of `type_name` that references `res` itself (the VM a NIC or disk is attached to)."""
        for other in self._by_key.values():
            if other.type == type_name and res.key in _references(other):
                return other
        return None

    def users(self, res: Resource, type_names: tuple[str, ...]) -> list[str]:
        """Ids of the resources of `type_names` that reference `res` or anything under it."""
        return [
            other.id
            for other in self._by_key.values()
            if other.type in type_names
            and any(ref == res.key or ref.startswith(res.key + "/") for ref in _references(other))
        ]

    # ----------------------------------------------------------------- listings

    def listed(
        self, sub: str, group: str | None, type_name: str | None, type_filter: str | None, *, lag: float = 0.0
    ) -> list[Resource]:
        """What a listing shows: of one type, or (no type) the top-level resources except groups, as ARM lists;
        with `lag`, as the store was that many seconds ago."""
        prefix = (f"/subscriptions/{sub}/" + (f"resourcegroups/{group}/" if group else "")).lower()
        now = time.monotonic()
        shown = list(self._by_key.values())
        if lag > 0:
            self._gone = {k: (r, t) for k, (r, t) in self._gone.items() if now - t < lag}
            shown = [r for r in shown if now - self._since[r.key] >= lag] + [r for r, _ in self._gone.values()]
        return [
            r
            for r in shown
            if r.key.startswith(prefix)
            and (type_name is None or r.type.lower() == type_name.lower())
            and (type_name is not None or (r.type.count("/") == 1 and r.type != GROUP_TYPE))
            and (type_filter is None or r.type.lower() == type_filter.lower())
        ]

    def children(self, owner_id: str, type_name: str) -> list[Resource]:
        """The resources of a child type under one owner (a VM's run commands), for its listing."""
        prefix = owner_id.lower() + "/"
        return [r for r in self._by_key.values() if r.type == type_name and r.key.startswith(prefix)]


def group_not_found(name: str) -> ArmError:
    return ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")


def group_being_deleted(name: str) -> ArmError:
    return ArmError(
        409,
        "ResourceGroupBeingDeleted",
        f"The resource group '{name}' is in deprovisioning state and cannot perform this operation.",
    )


def _ids_in(value: Any) -> list[str]:
    """Every ARM id referenced in a body (values of keys named id or ending in Id)."""
    if isinstance(value, list):
        return [i for v in value for i in _ids_in(v)]
    if not isinstance(value, dict):
        return []
    found = []
    for k, v in value.items():
        if (k == "id" or k.endswith("Id")) and isinstance(v, str) and v.lower().startswith("/subscriptions/"):
            found.append(v)
        else:
            found += _ids_in(v)
    return found


def _references(res: Resource) -> set[str]:
    """Lower-cased ids a resource points at, outside its own subtree."""
    return {i.lower() for i in _ids_in(res.properties) if not i.lower().startswith(res.key)}


def tags_match(tags: dict[str, str], wanted: dict[str, str | None]) -> bool:
    """Whether `tags` has every wanted tag (names case-insensitive); a None value matches any value."""
    lowered = {k.lower(): v for k, v in tags.items()}
    return all(k.lower() in lowered and (v is None or lowered[k.lower()] == v) for k, v in wanted.items())
