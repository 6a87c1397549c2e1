"""The machinery every resource type shares: PUT, GET, HEAD, PATCH and DELETE of a resource, listings, actions,
and rendering a resource as GET shows it. A type's own rules come in through its hooks (see provider.py).

* PUT: 201 (new) / 200 (update) with a non-terminal provisioningState and Azure-AsyncOperation, never Location,
  or 202 / 200 (`put="aao202"`), or 202 with Location only (`put="location"`). A create or update moves on
  with each poll of its operation and each GET of the resource, so a caller that lost the operation can still
  watch the resource end.
* PATCH merges and completes at once; it still names an (already finished) operation so callers that treat it
  as an LRO (`begin_update`) poll once and read the resource.
* DELETE: 202 with both Azure-AsyncOperation and Location (204 when already gone), or synchronous 200
  (`delete="sync"`); refused while the type's `in_use` rule finds users.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from .operations import lro_headers, start_operation
from .protocol import ENVELOPE, ArmError, Request, Response, check_rest_shape, method_not_allowed
from .provider import ResourceType, Route
from .store import Resource, group_being_deleted, tags_match

if TYPE_CHECKING:
    from .server import ArmEmulator


def resource_type(arm: ArmEmulator, ns: str, types: list[str]) -> ResourceType:
    """The registered type of a namespace and type path (`virtualMachines/runCommands`), or ARM's 400."""
    spec = arm.types.get("/".join([ns, *types]).lower())
    if spec is None:
        raise ArmError(
            400,
            "InvalidResourceType",
            f"The resource type '{'/'.join(types)}' could not be found in the namespace '{ns}'.",
        )
    return spec


def resource_id(arm: ArmEmulator, sub: str, group: str, spec: ResourceType, names: list[str]) -> str:
    """A resource's id from its type and names: the type as registered, the group as it was created."""
    ns, *types = spec.name.split("/")
    pairs = "/".join(f"{t}/{n}" for t, n in zip(types, names, strict=True))
    return f"{arm.store.group_id(sub, group)}/providers/{ns}/{pairs}"


def _type_of(arm: ArmEmulator, res: Resource) -> ResourceType | None:
    """A stored resource's type; None for a resource group, which has no generic URL."""
    return arm.types.get(res.type.lower())


def render(arm: ArmEmulator, res: Resource, expand: str | None = None) -> dict[str, Any]:
    """The resource as GET shows it, with what its type's `render` hook computes."""
    out: dict[str, Any] = {"id": res.id, "name": res.name, "type": res.type, **copy.deepcopy(res.envelope)}
    props = copy.deepcopy(res.properties)
    spec = _type_of(arm, res)
    if spec is not None and spec.etag:
        out["etag"] = f'W/"{uuid.uuid5(uuid.NAMESPACE_URL, res.key + json.dumps(props, sort_keys=True))}"'
    if spec is not None and spec.render is not None:
        spec.render(arm, res, out, props, (expand or "").lower())
    out["properties"] = props
    return out


def release(arm: ArmEmulator, res: Resource) -> None:
    """Runs the type's `release` hook: the resource is leaving the store, or the emulator is stopping."""
    spec = _type_of(arm, res)
    if spec is not None and spec.release is not None:
        spec.release(arm, res)


def remove(arm: ArmEmulator, res: Resource) -> None:
    """Removes a resource with its children and what ARM deletes along with it."""
    for gone in arm.store.remove_tree(res):
        release(arm, gone)
    spec = _type_of(arm, res)
    if spec is not None and spec.deletes_along is not None:
        for rid in spec.deletes_along(arm, res):
            arm.store.discard(rid)


def list_answer(arm: ArmEmulator, req: Request, sub: str, group: str | None, type_name: str | None) -> Response:
    """A listing of a subscription or group, of one type or (None) of every top-level resource, honouring
    `$filter` on resourceType and on tagName (and tagValue).

    The listing of every resource (`/resources`) runs `listing_lag` seconds behind the store, and when filtered by
    a tag it returns no tags, as the spec's `$filter` description says ("When you filter by a tag name and value,
    the tags for each resource are not returned in the results")."""
    filt = req.query.get("$filter", "")
    tag = re.search(r"tagname\s+eq\s+'([^']*)'(?:\s+and\s+tagvalue\s+eq\s+'([^']*)')?", filt, re.I)
    rtype = re.search(r"resourcetype\s+eq\s+'([^']*)'", filt, re.I)
    generic = type_name is None
    with arm.lock:
        listed = arm.store.listed(
            sub, group, type_name, rtype.group(1) if rtype else None, lag=arm.listing_lag if generic else 0.0
        )
        found = [render(arm, r) for r in listed]
    if tag is not None:
        found = [r for r in found if tags_match(r.get("tags") or {}, {tag.group(1): tag.group(2)})]
        if generic:
            for r in found:
                r.pop("tags", None)
    return Response(200, {"value": found})


# ----------------------------------------------------------------- routes


def _list_type(arm: ArmEmulator, req: Request, sub: str, ns: str, type_name: str) -> Response:
    return list_answer(arm, req, sub, None, resource_type(arm, ns, [type_name]).name)


def _serve_provider_path(arm: ArmEmulator, req: Request, sub: str, group: str, ns: str, path: str) -> Response:
    """`.../resourceGroups/{group}/providers/{ns}/{path}`: a resource (type/name pairs), a listing of one type
    (a lone type, or a child type under a resource), or an action on a resource."""
    parts = path.split("/")
    if len(parts) % 2 == 0:
        spec = resource_type(arm, ns, parts[0::2])
        return _serve_resource(arm, req, sub, group, spec, parts[1::2])
    if len(parts) == 1:
        arm.store.require_group(sub, group)
        return list_answer(arm, req, sub, group, resource_type(arm, ns, parts).name)
    owner_spec = resource_type(arm, ns, parts[:-1:2])
    owner_id = resource_id(arm, sub, group, owner_spec, parts[1::2])
    child = arm.types.get(f"{owner_spec.key}/{parts[-1].lower()}")
    if child is not None and req.method == "GET":
        with arm.lock:
            arm.store.require_group(sub, group)
            arm.store.get(owner_id)
            found = [render(arm, r) for r in arm.store.children(owner_id, child.name)]
        return Response(200, {"value": found})
    return _run_action(arm, req, owner_id, owner_spec, parts[-1].lower())


ROUTES = (
    Route("providers/([^/]+)/([^/]+)", _list_type, method="GET"),
    Route("resourcegroups/([^/]+)/providers/([^/]+)/(.+)", _serve_provider_path),
)


# ----------------------------------------------------------------- one resource


def _serve_resource(
    arm: ArmEmulator, req: Request, sub: str, group: str, spec: ResourceType, names: list[str]
) -> Response:
    with arm.lock:
        rg = arm.store.require_group(sub, group)
        rid = resource_id(arm, sub, group, spec, names)
        if req.method == "GET":
            res = arm.store.get(rid)
            if spec.read is not None:
                spec.read(arm, res)
            if "operation" in res.state:
                res.state["operation"].advance()
            return Response(200, render(arm, res, req.query.get("$expand")))
        if req.method == "HEAD":
            return Response(204 if rid in arm.store else 404)
        if req.method == "PUT":
            resp, created = _put(arm, req, rg, spec, rid)
        elif req.method == "PATCH":
            return _patch(arm, req, arm.store.get(rid))
        elif req.method == "DELETE":
            return _delete(arm, req, spec, rid)
        else:
            raise method_not_allowed(req)
    if created is not None and spec.after_create is not None:
        # Without the lock every request needs: a VM's guest can take a while to boot.
        spec.after_create(arm, created)
    return resp


def _put(
    arm: ArmEmulator, req: Request, rg: Resource, spec: ResourceType, rid: str
) -> tuple[Response, Resource | None]:
    """Stores the resource and starts its operation; also returns it when this PUT created it."""
    if rg.properties["provisioningState"] == "Deleting":
        raise group_being_deleted(rg.name)
    if spec.name.count("/") > 1:
        parent_id = rid.rsplit("/", 2)[0]
        if parent_id not in arm.store:
            raise ArmError(
                404,
                "ParentResourceNotFound",
                f"Can not perform requested operation on nested resource. Parent resource "
                f"'{parent_id.rsplit('/', 1)[1]}' not found.",
            )
    body = req.json()
    check_rest_shape(body)
    if spec.tracked and not body.get("location"):
        raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
    existing = arm.store.find(rid)
    if existing is not None and existing.properties.get("provisioningState") == "Deleting":
        raise ArmError(409, "Conflict", f"Resource '{existing.name}' is being deleted.")
    res = Resource(
        existing.id if existing else rid,
        spec.name,
        {k: body[k] for k in ENVELOPE if k in body},
        copy.deepcopy(body.get("properties") or {}),
        existing.state if existing else {},
    )
    if spec.tracked:
        res.envelope.setdefault("tags", {})
    if spec.prepare is not None:
        spec.prepare(arm, res, existing)
    res.properties["provisioningState"] = "Updating" if existing else spec.creating
    arm.store.add(res)

    def succeed() -> dict[str, Any] | None:
        res.properties["provisioningState"] = "Succeeded"
        if spec.ready is not None:
            spec.ready(arm, res)
        return render(arm, res)

    def fail() -> None:
        res.properties["provisioningState"] = "Failed"
        if existing is None and spec.failed is not None:
            spec.failed(arm, res)

    op = start_operation(arm, req, succeed, fail, spec.put_polls(arm, res) if spec.put_polls else None)
    res.state["operation"] = op
    created = None if existing else res
    if spec.put == "location":
        return Response(202, None, lro_headers(arm, req, res, op, aao=False)), created
    status = 200 if existing else (202 if spec.put == "aao202" else 201)
    return Response(status, render(arm, res), lro_headers(arm, req, res, op, location=False)), created


def _patch(arm: ArmEmulator, req: Request, res: Resource) -> Response:
    body = req.json()
    check_rest_shape(body)
    if "tags" in body:
        res.envelope["tags"] = body["tags"] or {}
    _merge(res.properties, body.get("properties") or {})
    op = start_operation(arm, req, lambda: render(arm, res), limit=lambda: 0)
    return Response(200, render(arm, res), lro_headers(arm, req, res, op, location=False))


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _delete(arm: ArmEmulator, req: Request, spec: ResourceType, rid: str) -> Response:
    res = arm.store.find(rid)
    if res is None:
        return Response(204)
    if spec.in_use is not None:
        users = arm.store.users(res, spec.in_use.users)
        if users:
            raise ArmError(
                spec.in_use.status,
                spec.in_use.code,
                f"{res.type.split('/')[-1]} {res.id} cannot be deleted because it is in use by the "
                f"following resources: {', '.join(users)}. In order to delete it, remove the association "
                "with the resource(s).",
            )
    if spec.check_delete is not None:
        spec.check_delete(arm, res)
    if spec.delete == "sync":
        arm.store.discard(rid)
        return Response(200)
    before = res.properties.get("provisioningState")
    res.properties["provisioningState"] = "Deleting"

    def succeed() -> None:
        remove(arm, res)
        if spec.deleted is not None:
            spec.deleted(arm, res)
        return None

    def fail() -> None:
        res.properties["provisioningState"] = before

    op = start_operation(arm, req, succeed, fail)
    return Response(202, None, lro_headers(arm, req, res, op))


def _run_action(arm: ArmEmulator, req: Request, owner_id: str, spec: ResourceType, action: str) -> Response:
    entry = spec.actions.get(action)
    if entry is None or req.method != entry.method:
        raise ArmError(
            404 if entry is None else 405,
            "NotFound" if entry is None else "MethodNotAllowed",
            f"No {req.method} action '{action}' on {spec.name}.",
        )
    with arm.lock:
        _, _, sub, _, group = owner_id.split("/")[:5]
        arm.store.require_group(sub, group)
        return entry.run(arm, req, arm.store.get(owner_id))
