"""What a resource provider module registers: its resource types, each with the hooks that hold its rules, and the
paths it serves outside the generic resource URLs.

The generic machinery (crud.py) runs every PUT, GET, PATCH, DELETE, listing and action the same way and calls a
type's hooks at fixed points, so a rule of one resource type is a hook of that type and nowhere else. Every hook is
a plain function taking the emulator first; hooks run with the emulator's lock held unless they say otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .protocol import Request, Response
from .store import Resource

if TYPE_CHECKING:
    from .server import ArmEmulator

    Prepare = Callable[[ArmEmulator, Resource, Resource | None], None]
    OnResource = Callable[[ArmEmulator, Resource], None]
    PutPolls = Callable[[ArmEmulator, Resource], Callable[[], int | None]]
    Render = Callable[[ArmEmulator, Resource, dict[str, Any], dict[str, Any], str], None]
    PartsOf = Callable[[ArmEmulator, Resource], list[str]]
    ActionHandler = Callable[[ArmEmulator, Request, Resource], Response]
    RouteHandler = Callable[..., Response]


@dataclass(frozen=True)
class Action:
    """A POST on a resource (`.../virtualMachines/vm1/deallocate`), or a GET for a view such as instanceView."""

    run: ActionHandler  # (emulator, request, resource) -> answer
    method: str = "POST"


@dataclass(frozen=True)
class InUse:
    """Deleting a resource that one of `users` still references fails in ARM with this answer (network answers
    400, compute 409). Other references (a snapshot's source disk) do not block."""

    status: int
    code: str
    users: tuple[str, ...]  # type names


@dataclass(frozen=True)
class ResourceType:
    """One resource type: how ARM answers its PUT and DELETE, and the hooks with its own rules.

    Hooks, each optional:

    * `prepare(arm, res, existing)`: validates a PUT (raise ArmError to refuse it) and completes the resource
      about to be stored: defaults, derived fields, write-only secrets dropped, child resources made.
      `existing` is the stored resource a PUT updates, None for a create.
    * `put_polls(arm, res)`: how many InProgress polls the PUT's operation answers, read at every poll, None for
      not yet (a gallery version waits for its slowest region); without it, the emulator's `operation_polls`.
    * `ready(arm, res)`: runs when the PUT's operation succeeds; raise ArmError to fail it instead.
    * `failed(arm, res)`: runs when a create's operation fails (what the failed resource keeps hold of).
    * `after_create(arm, res)`: runs once after a create, without the lock, before the PUT is answered: slow work
      such as booting a VM's guest.
    * `read(arm, res)`: runs at every GET of the resource, before it is rendered.
    * `render(arm, res, out, properties, expand)`: adds computed fields to the answer (`out` and its
      `properties`, both copies); `expand` is the request's lower-cased $expand, "" without one.
    * `actions`: POSTs (and GET views) under the resource, keyed by lower-cased action name.
    * `in_use`: the answer refusing DELETE while other resources reference this one.
    * `check_delete(arm, res)`: refuses a DELETE for a reason of the type's own (raise ArmError).
    * `deletes_along(arm, res)`: ids of other resources ARM deletes with this one.
    * `deleted(arm, res)`: runs once a DELETE's operation has removed the resource and what goes along with it.
    * `release(arm, res)`: frees what the resource holds outside the store (a VM's guest) when it leaves the
      store or the emulator stops.
    """

    name: str  # canonical, e.g. Microsoft.Compute/galleries/images/versions
    # PUT's answer: 201 (new) / 200 with Azure-AsyncOperation ("aao201"), 202 / 200 with it ("aao202"), or 202
    # with Location only ("location").
    put: Literal["aao201", "aao202", "location"]
    delete: Literal["async", "sync"] = "async"
    tracked: bool = True  # tracked resources carry their own location
    creating: str = "Creating"  # provisioningState while a create runs
    etag: bool = False  # a weak etag derived from the resource's state, as Microsoft.Network answers
    prepare: Prepare | None = None
    put_polls: PutPolls | None = None
    ready: OnResource | None = None
    failed: OnResource | None = None
    after_create: OnResource | None = None
    read: OnResource | None = None
    render: Render | None = None
    actions: Mapping[str, Action] = field(default_factory=dict)
    in_use: InUse | None = None
    check_delete: OnResource | None = None
    deletes_along: PartsOf | None = None
    deleted: OnResource | None = None
    release: OnResource | None = None

    @property
    def key(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Route:
    """A path under /subscriptions/{sub}/ served by a handler of its own (resource groups, the marketplace).

    `pattern` is matched case-insensitively against the whole path after the subscription id; the handler gets
    `(arm, request, subscription, *groups)` and takes the emulator's lock itself. With `method` set, other
    methods pass on to the next route.
    """

    pattern: str
    handler: RouteHandler
    method: str | None = None

    def answer(self, arm: ArmEmulator, req: Request, sub: str, path: str) -> Response | None:
        """The handler's answer, or None when the route does not take this request."""
        if self.method is not None and req.method != self.method:
            return None
        found = re.fullmatch(self.pattern, path, re.IGNORECASE)
        return None if found is None else self.handler(arm, req, sub, *found.groups())


@dataclass(frozen=True)
class Provider:
    """A resource provider: its types, and the routes it serves besides their generic URLs."""

    types: tuple[ResourceType, ...]
    routes: tuple[Route, ...] = ()
