"""Microsoft.Resources: resource groups and the generic listings of what a subscription or group holds.

A group's PUT is synchronous (201 / 200); its DELETE answers 202 with Location only, under the subscription, and
deletes everything inside when its operation ends. A group being deleted refuses new resources (crud.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .crud import list_answer, remove, render
from .operations import start_operation, subscription_lro_headers
from .protocol import ArmError, Request, Response, check_rest_shape, method_not_allowed
from .provider import Provider, Route
from .store import GROUP_TYPE, Resource, group_being_deleted, group_not_found

if TYPE_CHECKING:
    from .server import ArmEmulator


def _group(arm: ArmEmulator, req: Request, sub: str, name: str) -> Response:
    with arm.lock:
        gid = arm.store.group_id(sub, name)
        group = arm.store.find(gid)
        if req.method == "HEAD":
            return Response(204 if group else 404)
        if req.method == "PUT":
            return _put_group(arm, req, gid, name, group)
        if group is None:
            raise group_not_found(name)
        if req.method == "GET":
            return Response(200, render(arm, group))
        if req.method == "PATCH":
            body = req.json()
            if "tags" in body:
                group.envelope["tags"] = body["tags"] or {}
            return Response(200, render(arm, group))
        if req.method == "DELETE":
            return _delete_group(arm, req, group)
    raise method_not_allowed(req)


def _put_group(arm: ArmEmulator, req: Request, gid: str, name: str, group: Resource | None) -> Response:
    body = req.json()
    check_rest_shape(body)
    if not body.get("location"):
        raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
    if group and group.properties["provisioningState"] == "Deleting":
        raise group_being_deleted(name)
    if len(name) > 90 or not re.fullmatch(r"[-\w._()]+", name) or name.endswith("."):
        raise ArmError(400, "InvalidResourceGroupName", f"Resource group name '{name}' is invalid.")
    envelope = {"location": body["location"], "tags": body.get("tags") or {}}
    if group:
        group.envelope = envelope
        return Response(200, render(arm, group))
    group = Resource(gid, GROUP_TYPE, envelope, {"provisioningState": "Succeeded"})
    arm.store.add(group)
    return Response(201, render(arm, group))


def _delete_group(arm: ArmEmulator, req: Request, group: Resource) -> Response:
    before = group.properties["provisioningState"]
    group.properties["provisioningState"] = "Deleting"

    def succeed() -> None:
        remove(arm, group)
        return None

    def fail() -> None:
        group.properties["provisioningState"] = before

    op = start_operation(arm, req, succeed, fail)
    # The subscription as the group's id spells it, which need not be the request's case.
    return Response(202, None, subscription_lro_headers(arm, req, group.id.split("/")[2], op))


def _list_groups(arm: ArmEmulator, req: Request, sub: str) -> Response:
    return list_answer(arm, req, sub, None, GROUP_TYPE)


def _list_subscription(arm: ArmEmulator, req: Request, sub: str) -> Response:
    return list_answer(arm, req, sub, None, None)


def _list_group(arm: ArmEmulator, req: Request, sub: str, group: str) -> Response:
    arm.store.require_group(sub, group)
    return list_answer(arm, req, sub, group, None)


PROVIDER = Provider(
    types=(),
    routes=(
        Route("resourcegroups", _list_groups, method="GET"),
        Route("resourcegroups/([^/]+)", _group),
        Route("resources", _list_subscription, method="GET"),
        Route("resourcegroups/([^/]+)/resources", _list_group, method="GET"),
    ),
)
