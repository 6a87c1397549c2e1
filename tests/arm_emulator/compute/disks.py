"""Managed disks and snapshots: their creation from a source, their state towards a VM, and export (beginGetAccess
hands out a SAS URL of the emulator's VHD; endGetAccess revokes it, and the blob copies still reading from it fail).

PUT answers 202 / 200 (never 201) with Azure-AsyncOperation, which is all the SDK accepts for these types. A disk
attached to a VM refuses deletion (409) and export unless the VM is deallocated.

Copies that outlast their call: a snapshot made with `creationData.createOption` CopyStart (usually into another
region) is created at once and then reports `completionPercent` below 100 for `snapshot_copy_polls` GETs; an image
or disk cannot be made from it until then. The setting None keeps the copy going until a test sets a number. As
Azure documents it ("Copy an incremental snapshot to a new region"; Azure/azure-sdk-for-java#31861), both the copy
and its source must be incremental, and the incremental snapshots of one disk are copied one at a time: a second
CopyStart while another copy of that disk's snapshots runs is refused (409; the restriction is documented, the
code it answers with is not, so the emulator answers Conflict).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..operations import accept_action
from ..protocol import ArmError, Request, Response, check_rest_shape, now, operation_not_allowed
from ..provider import Action, InUse, ResourceType
from ..store import Resource
from .names import DISKS, SNAPSHOTS, VIRTUAL_MACHINES

if TYPE_CHECKING:
    from ..server import ArmEmulator


# ----------------------------------------------------------------- disks


def _prepare_disk(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    creation = res.properties.get("creationData") or {}
    if not creation.get("createOption"):
        raise ArmError(400, "InvalidParameter", "Required parameter 'creationData.createOption' is missing.")
    source = arm.store.check_refs(creation)
    if source and "diskSizeGB" not in res.properties:
        res.properties["diskSizeGB"] = source[0].properties.get("diskSizeGB")
    res.properties.setdefault("timeCreated", now())


def _render_disk(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    vm = arm.store.referrer(res, VIRTUAL_MACHINES)
    if vm is not None:
        out["managedBy"] = vm.id
    props["diskState"] = (
        "ActiveSAS"
        if res.state.get("sas")
        else "Unattached"
        if vm is None
        else "Reserved"
        if vm.state.get("power") == "deallocated"
        else "Attached"
    )


def _export_disk(arm: ArmEmulator, req: Request, disk: Resource) -> Response:
    vm = arm.store.referrer(disk, VIRTUAL_MACHINES)
    if vm is not None and vm.state.get("power") != "deallocated":
        raise operation_not_allowed(f"Disk '{disk.name}' is attached to VM '{vm.id}' that is not deallocated.")
    return _grant(arm, req, disk)


# ----------------------------------------------------------------- snapshots


def _prepare_snapshot(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    creation = res.properties.get("creationData") or {}
    source = arm.store.check_refs(creation)
    if not source:
        raise ArmError(400, "InvalidParameter", "A snapshot needs creationData.sourceResourceId or sourceUri.")
    check_copied(arm, source)
    if str(creation.get("createOption", "")).lower() == "copystart":
        if source[0].type != SNAPSHOTS:
            raise ArmError(400, "InvalidParameter", "CopyStart copies a snapshot: sourceResourceId must be one.")
        if res.properties.get("incremental") is not True or source[0].properties.get("incremental") is not True:
            raise ArmError(
                400,
                "InvalidParameter",
                f"CopyStart is only supported for incremental snapshots; the copy and its source "
                f"'{source[0].id}' must both be incremental.",
            )
        if existing is None:
            _refuse_a_second_copy(arm, res, source[0])
            res.state["copy_polls"] = 0
            res.state["copy_of"] = _disk_of(source[0])
    res.properties.setdefault("diskSizeGB", source[0].properties.get("diskSizeGB"))
    res.properties.setdefault("osType", source[0].properties.get("osType"))
    if source[0].properties.get("securityProfile"):
        res.properties.setdefault("securityProfile", source[0].properties["securityProfile"])
    res.properties.setdefault("timeCreated", now())


def _disk_of(snapshot: Resource) -> str:
    """The disk an incremental snapshot was taken of (itself when it is not known)."""
    return str((snapshot.properties.get("creationData") or {}).get("sourceResourceId") or snapshot.id).lower()


def _refuse_a_second_copy(arm: ArmEmulator, res: Resource, source: Resource) -> None:
    """One copy at a time of the incremental snapshots of one disk."""
    disk = _disk_of(source)
    for other in arm.store:
        if other.key != res.key and other.state.get("copy_of") == disk and (_copy_percent(arm, other) or 0) < 100:
            raise ArmError(
                409,
                "Conflict",
                f"You can only copy one incremental snapshot of a particular disk at a time: '{other.id}' is still "
                f"being copied from a snapshot of '{disk}'.",
            )


def _count_copy_read(arm: ArmEmulator, res: Resource) -> None:
    """A CopyStart copy moves on with each GET of the finished snapshot."""
    if "copy_polls" in res.state and res.properties.get("provisioningState") == "Succeeded":
        res.state["copy_polls"] += 1


def _render_snapshot(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    if "copy_polls" in res.state:
        props["completionPercent"] = _copy_percent(arm, res)


def _copy_percent(arm: ArmEmulator, res: Resource) -> float | None:
    """A CopyStart snapshot's completionPercent, None for any other resource."""
    if "copy_polls" not in res.state:
        return None
    need = arm.snapshot_copy_polls
    if need is not None and res.state["copy_polls"] > need:
        return 100.0
    return float(min(99, res.state["copy_polls"] * 100 // ((need or 0) + 1)))


def check_copied(arm: ArmEmulator, sources: list[Resource]) -> None:
    """Refuses to make anything from a snapshot whose copy has not finished."""
    for source in sources:
        percent = _copy_percent(arm, source)
        if percent is not None and percent < 100:
            raise operation_not_allowed(f"The copy of snapshot '{source.id}' is {percent:.0f}% complete; wait for it.")


# ----------------------------------------------------------------- export, both kinds


def _export_name(res: Resource) -> str:
    """The blob a disk or snapshot is exported as, named after it and its resource group."""
    return f"{res.name}-{res.key.split('/')[4]}.vhd"


def _grant(arm: ArmEmulator, req: Request, res: Resource) -> Response:
    body = req.json()
    check_rest_shape(body, envelope=False)
    if body.get("access") not in ("Read", "Write", "None"):
        raise ArmError(400, "InvalidParameter", "The value of parameter access is invalid.")

    def succeed() -> dict[str, Any]:
        res.state["sas"] = arm.blobs.publish(_export_name(res), arm.vhd)
        return {"accessSAS": res.state["sas"]}

    return accept_action(arm, req, res, succeed)


def _revoke(arm: ArmEmulator, req: Request, res: Resource) -> Response:
    """endGetAccess: every SAS of the disk stops working, which fails the blob copies still reading from it."""

    def succeed() -> None:
        sas = res.state.pop("sas", None)
        if sas:
            arm.blobs.unpublish(_export_name(res))
            if arm.blob_proxy is not None:
                arm.blob_proxy.revoke(sas)
        return None

    return accept_action(arm, req, res, succeed)


TYPES = (
    ResourceType(
        DISKS,
        "aao202",
        prepare=_prepare_disk,
        render=_render_disk,
        actions={"begingetaccess": Action(_export_disk), "endgetaccess": Action(_revoke)},
        in_use=InUse(409, "OperationNotAllowed", (VIRTUAL_MACHINES,)),
    ),
    ResourceType(
        SNAPSHOTS,
        "aao202",
        prepare=_prepare_snapshot,
        read=_count_copy_read,
        render=_render_snapshot,
        actions={"begingetaccess": Action(_grant), "endgetaccess": Action(_revoke)},
    ),
)
