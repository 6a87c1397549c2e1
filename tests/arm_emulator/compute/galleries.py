"""Compute galleries, their image definitions and image versions, with per-region replication of a version.

A version's create ends with its slowest target region, and never while one of them is hung; a region that fails
(see `Faults.slow_replication`) fails the version's operation. `$expand=ReplicationStatus` shows each region's
state and progress.

A version's regions follow ARM's rules, each refused with 400 InvalidParameter: the publishing profile's target
regions must contain the version's own location (hashicorp/packer#8895), may name a region only once
(terraform-provider-azurerm#7751), and the source image must be in the version's region (MicrosoftDocs/azure-docs
#28793).

Replication mode: a Shallow version (publishingProfile.replicationMode) refers to its source instead of copying
it, so it is there at once, with no replication to wait for; and so it may be only in its own region, one replica
(400 InvalidParameter otherwise). Full, the default, copies to every target region.

Security types: a Gen2 image definition made without a `SecurityType` feature is TrustedLaunchSupported, as Trusted
Launch as default (TLaD) makes it. A version of a TrustedLaunchSupported definition is made only from a VHD, a
managed image or another gallery version, not from a VM (packer-plugin-azure#304); one of a TrustedLaunch or
confidential definition not from a managed image, which is never of that security type (the emulator's wording). A
snapshot of a TrustedLaunch VM's disk is TrustedLaunch too, and goes only into a TrustedLaunch definition; a
TrustedLaunchSupported one takes no snapshot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..operations import Operation
from ..protocol import ArmError, now, region_name
from ..provider import ResourceType
from ..store import Resource
from .names import GALLERIES, IMAGE_DEFINITIONS, IMAGE_VERSIONS, IMAGES, SNAPSHOTS, VIRTUAL_MACHINES

if TYPE_CHECKING:
    from ..server import ArmEmulator


def _prepare_gallery(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    res.properties["identifier"] = {"uniqueName": f"{res.id.split('/')[2]}-{res.name.upper()}"}


def _prepare_definition(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    for required in ("osType", "osState", "identifier"):
        if not res.properties.get(required):
            raise ArmError(400, "InvalidParameter", f"Required parameter '{required}' is missing (null).")
    features = res.properties.setdefault("features", [])
    if res.properties.get("hyperVGeneration") == "V2" and not any(f.get("name") == "SecurityType" for f in features):
        features.append({"name": "SecurityType", "value": "TrustedLaunchSupported"})


def definition_security_type(definition: Resource) -> str:
    features = definition.properties.get("features") or []
    return next((f.get("value") for f in features if f.get("name") == "SecurityType"), None) or "Standard"


def _check_security_type(arm: ArmEmulator, version: Resource, sources: list[Resource]) -> None:
    definition = arm.store.find(version.id.rsplit("/versions/", 1)[0])
    wanted = definition_security_type(definition) if definition is not None else "Standard"
    for source in sources:
        made_as = ((source.properties.get("securityProfile") or {}).get("securityType")) or "Standard"
        if wanted == "TrustedLaunchSupported" and source.type in (VIRTUAL_MACHINES, SNAPSHOTS):
            raise ArmError(
                400,
                "InvalidParameter",
                f"The security type 'TrustedLaunchSupported' is not supported for the source id '{source.id}'. "
                "Currently only Vhd Blob, User Image and Gallery Image Version sources are supported for "
                "'TrustedLaunchSupported' images.",
            )
        if source.type == SNAPSHOTS and made_as != wanted and "TrustedLaunch" in (made_as, wanted):
            raise ArmError(
                400,
                "InvalidParameter",
                f"The source '{source.id}' is of security type {made_as}, the image definition of {wanted}: they "
                "must match.",
            )
        if wanted in ("TrustedLaunch", "ConfidentialVM", "ConfidentialVmSupported") and source.type == IMAGES:
            raise ArmError(
                400,
                "InvalidParameter",
                f"The security type '{wanted}' is not supported for the source id '{source.id}': a managed image is "
                "never of that security type.",
            )


def _prepare_version(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    profile = res.properties.get("storageProfile") or {}
    sources = arm.store.check_refs(profile)
    if not sources:
        raise ArmError(400, "InvalidParameter", "The gallery image version needs a source in storageProfile.")
    location = region_name(str(res.envelope["location"]))
    for source in sources:
        where = arm.store.region(source)
        if where != location:
            raise ArmError(
                400,
                "InvalidParameter",
                f"The source '{source.id}' is in region '{where}'; a gallery image version's source must be in the "
                f"version's region '{location}'.",
            )
    _check_security_type(arm, res, sources)
    publishing = res.properties.setdefault("publishingProfile", {})
    publishing.setdefault("targetRegions", [{"name": res.envelope["location"], "regionalReplicaCount": 1}])
    regions = [region_name(str(r.get("name", ""))) for r in publishing["targetRegions"]]
    repeated = sorted({r for r in regions if regions.count(r) > 1})
    if repeated:
        raise ArmError(
            400, "InvalidParameter", f"The publishing profile names the target region(s) {repeated} more than once."
        )
    if location not in regions:
        raise ArmError(
            400,
            "InvalidParameter",
            f"The regions in the publishing profile {regions} must contain the location of image version '{location}'.",
        )
    publishing.setdefault("replicaCount", 1)
    publishing.setdefault("storageAccountType", "Standard_LRS")
    mode = publishing.setdefault("replicationMode", "Full")
    if mode not in ("Full", "Shallow"):
        raise ArmError(400, "InvalidParameter", f"The value '{mode}' of parameter 'replicationMode' is not valid.")
    if mode == "Shallow":
        counts = [publishing["replicaCount"], *(r.get("regionalReplicaCount", 1) for r in publishing["targetRegions"])]
        if regions != [location] or any(c != 1 for c in counts):
            raise ArmError(
                400,
                "InvalidParameter",
                f"Shallow replication is supported only in the image version's own region '{location}', with one "
                f"replica; the publishing profile names {regions}.",
            )
    publishing["publishedDate"] = now()
    # A version of snapshots names them as its disk images' sources; each is of its snapshot's size.
    for disk in [profile.get("osDiskImage") or {}, *(profile.get("dataDiskImages") or [])]:
        snapshot = arm.store.find((disk.get("source") or {}).get("id", ""))
        if snapshot is not None:
            disk.setdefault("sizeInGB", snapshot.properties.get("diskSizeGB") or 30)
            disk.setdefault("hostCaching", "ReadWrite" if disk is profile.get("osDiskImage") else "None")
    profile.setdefault("osDiskImage", {"sizeInGB": 30, "hostCaching": "ReadWrite"})
    # A version of a managed image has that image's data disks, each at its LUN.
    image = next((src for src in sources if src.type == IMAGES), None)
    if image is not None and "dataDiskImages" not in profile:
        profile["dataDiskImages"] = [
            {"lun": d["lun"], "sizeInGB": d.get("diskSizeGB") or 30, "hostCaching": d.get("caching", "None")}
            for d in (image.properties.get("storageProfile") or {}).get("dataDisks") or []
        ]


def _replication_limit(arm: ArmEmulator, res: Resource) -> Callable[[], int | None]:
    """Records each target region's replication plan; the version's operation ends with the
    slowest region, and never while one of them is hung."""
    plans: dict[str, tuple[Callable[[], int | None], dict[str, str] | None]] = {}
    # Shallow: nothing is copied, so the version is there on the first poll.
    shallow = res.properties["publishingProfile"].get("replicationMode") == "Shallow"
    polls = 0 if shallow else arm.operation_polls
    for region in res.properties["publishingProfile"]["targetRegions"]:
        fault = None if shallow else arm.faults.replication_fault(region["name"])
        error = None
        if fault is not None and fault.fail_code:
            error = {
                "code": fault.fail_code,
                "message": fault.fail_message or f"Replication to region '{region['name']}' failed.",
            }
        need = (lambda f=fault: f.polls) if fault is not None else (lambda: polls)
        plans[region["name"]] = (need, error)
    res.state["replication"] = plans

    def limit() -> int | None:
        needs = [need() for need, _ in plans.values()]
        return None if None in needs else max(needs)

    return limit


def _fail_on_failed_region(arm: ArmEmulator, res: Resource) -> None:
    failed = [e for _, e in res.state["replication"].values() if e]
    if failed:
        raise ArmError(409, failed[0]["code"], failed[0]["message"])


def _render_version(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    if expand == "replicationstatus":
        props["replicationStatus"] = _replication_status(res)


def _replication_status(res: Resource) -> dict[str, Any]:
    op: Operation = res.state["operation"]
    summary = []
    for region, (need_of, failure) in res.state["replication"].items():
        need = need_of()
        done = op.status != "InProgress" or (need is not None and op.polls > need)
        progress = min(99, op.polls * 100 // (need + 1) if need is not None else op.polls)
        if done and failure:
            summary.append({"region": region, "state": "Failed", "details": failure["message"], "progress": progress})
        elif done:
            summary.append({"region": region, "state": "Completed", "details": "", "progress": 100})
        else:
            summary.append({"region": region, "state": "Replicating", "details": "", "progress": progress})
    states = {s["state"] for s in summary}
    aggregated = "Failed" if "Failed" in states else "Completed" if states == {"Completed"} else "InProgress"
    return {"aggregatedState": aggregated, "summary": summary}


TYPES = (
    ResourceType(GALLERIES, "aao201", prepare=_prepare_gallery),
    ResourceType(IMAGE_DEFINITIONS, "aao201", prepare=_prepare_definition),
    ResourceType(
        IMAGE_VERSIONS,
        "aao201",
        prepare=_prepare_version,
        put_polls=_replication_limit,
        ready=_fail_on_failed_region,
        render=_render_version,
    ),
)
