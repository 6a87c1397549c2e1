"""Virtual machines, their power states and actions, their guests, and managed run commands.

A VM's PUT creates its OS disk (unless attached) and its data disks (`storageProfile.dataDisks`: Empty ones of
their `diskSizeGB`, or FromImage ones from the data disks of the managed image it is made from, made for it when it
names none), and its parts with deleteOption Delete go with it. Power
actions (start, powerOff, deallocate, restart), runCommand and capture answer 202 with both LRO headers;
generalize is a synchronous 200, allowed only on a stopped or deallocated VM.

Security types, as Trusted Launch as default (TLaD) sets them: a VM made from a Gen2 image without
`securityProfile.securityType` is TrustedLaunch (secure boot and vTPM on); Standard must be asked for. A Gen1 image
takes only Standard. A managed image cannot be made from a TrustedLaunch or ConfidentialVM VM (see images.py).

A NIC is reserved for its VM for `nic_reservation` seconds (Azure's 180 by default) after that VM is deleted, and
after its create failed, when the VM never took the NIC (deleting the failed VM leaves it): deleting the NIC, or
making another VM with it (a VM made again under the same name is another VM), answers 400 NicReservedForAnotherVm
meanwhile (gardenlinux#4133, microsoft/AzureTRE#4511).

Guest execution: a VM's NIC private IP and public IP are loopback addresses. A test sets `guest_factory` to
start something that answers SSH for the VM (the local cloud's VM code can serve as a real guest) and returns
where it listens; see `GuestSpec` / `GuestEndpoint`. A guest that fails to start fails the VM's creation.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..operations import accept_action
from ..protocol import ArmError, Request, Response, check_rest_shape, now, operation_not_allowed
from ..provider import Action, ResourceType
from ..store import Resource
from .names import DISKS, IMAGE_VERSIONS, RUN_COMMANDS, VIRTUAL_MACHINES
from .platform_images import catalogue_entry

if TYPE_CHECKING:
    from ..server import ArmEmulator


@dataclass(frozen=True)
class GuestSpec:
    """What a guest factory learns about a new VM: enough to start a machine that accepts the
    credentials kiln put into the VM's osProfile."""

    vm_id: str
    name: str
    computer_name: str | None
    os_type: str
    admin_username: str | None
    admin_password: str | None
    ssh_public_keys: tuple[str, ...]
    image_reference: dict[str, Any]


@dataclass(frozen=True)
class GuestEndpoint:
    """Where a VM's guest answers. `host` is what the VM's NIC and public IP report; `port` is
    for the test to hand to kiln, since a loopback guest rarely listens on 22. `close` runs when
    the VM is deleted."""

    host: str = "127.0.0.1"
    port: int = 22
    close: Callable[[], None] | None = None


# ----------------------------------------------------------------- create and delete


def _prepare(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    props = res.properties
    arm.store.check_refs(props.get("networkProfile") or {})
    arm.store.check_refs((props.get("storageProfile") or {}).get("imageReference") or {})
    if not (props.get("hardwareProfile") or {}).get("vmSize"):
        raise ArmError(400, "InvalidParameter", "Required parameter 'hardwareProfile.vmSize' is missing (null).")
    for nic in (props.get("networkProfile") or {}).get("networkInterfaces") or []:
        owner = arm.store.referrer(arm.store[nic["id"]], VIRTUAL_MACHINES)
        if owner is not None and owner.key != res.key:
            raise ArmError(400, "NicInUse", f"Network interface {nic['id']} is used by existing VM {owner.id}.")
        reserved = nic_reserved_for(arm.store[nic["id"]])
        if reserved is not None and (existing is None or reserved[1] != existing.properties["vmId"]):
            raise nic_reserved(arm, reserved[0])
    os_profile = props.get("osProfile") or {}
    if existing is None:
        res.state["admin_password"] = os_profile.get("adminPassword")
    for secret in ("adminPassword", "customData"):  # write-only: ARM never returns them
        os_profile.pop(secret, None)
    storage = props.setdefault("storageProfile", {})
    image = storage.get("imageReference") or {}
    _check_plan(arm, res, image)
    _set_security_type(arm, res, image, existing)
    windows = "windowsConfiguration" in os_profile or "windows" in str(image.get("offer", "")).lower()
    computer = os_profile.get("computerName")
    if computer and len(computer) > (15 if windows else 64):
        raise ArmError(
            400, "InvalidParameter", f"The value '{computer}' of parameter 'osProfile.computerName' is too long."
        )
    if existing is not None:
        props["vmId"] = existing.properties["vmId"]
        props["timeCreated"] = existing.properties["timeCreated"]
        storage["osDisk"] = existing.properties["storageProfile"]["osDisk"]
        # The disks made by the first PUT stay attached at their LUNs, and the answer names them as it did then.
        made = {d["lun"]: d for d in existing.properties["storageProfile"].get("dataDisks") or []}
        storage["dataDisks"] = [made.get(d["lun"], d) for d in storage.get("dataDisks") or []]
        return
    props["vmId"] = str(uuid.uuid4())
    props["timeCreated"] = now()
    os_disk = storage.setdefault("osDisk", {})
    os_disk.setdefault("osType", "Windows" if windows else "Linux")
    os_disk.setdefault("name", f"{res.name}_OsDisk_1_{uuid.uuid4().hex}")
    os_disk.setdefault("caching", "ReadWrite")
    os_disk.setdefault("createOption", "FromImage")
    os_disk.setdefault("deleteOption", "Detach")
    managed = os_disk.setdefault("managedDisk", {})
    if os_disk["createOption"] == "Attach":
        arm.store.check_refs({"managedDisk": managed})
    else:
        disk_id = f"{'/'.join(res.id.split('/')[:5])}/providers/Microsoft.Compute/disks/{os_disk['name']}"
        managed["id"] = disk_id
        managed.setdefault("storageAccountType", "Standard_LRS")
        arm.store.add(
            Resource(
                disk_id,
                DISKS,
                {"location": res.envelope["location"], "tags": {}, "sku": {"name": managed["storageAccountType"]}},
                {
                    "osType": os_disk["osType"],
                    "diskSizeGB": os_disk.get("diskSizeGB", 30),
                    "creationData": {"createOption": "FromImage", "imageReference": image},
                    # The OS disk of a Trusted Launch VM is one: its snapshots, and what is made of them, are too.
                    **(
                        {"securityProfile": {"securityType": security_type(res)}}
                        if security_type(res) != "Standard"
                        else {}
                    ),
                    "provisioningState": "Succeeded",
                    "timeCreated": now(),
                },
            )
        )
    _make_data_disks(arm, res, image)
    res.state.update(power="starting", generalized=False, os_type=os_disk["osType"], computer_name=computer or res.name)


def _make_data_disks(arm: ArmEmulator, vm: Resource, image: dict[str, Any]) -> None:
    storage = vm.properties["storageProfile"]
    source = arm.store.find(image["id"]) if image.get("id") else None
    from_image = (source.properties.get("storageProfile") or {}).get("dataDisks") or [] if source is not None else []
    if not storage.get("dataDisks") and from_image:
        storage["dataDisks"] = [{"lun": d["lun"], "createOption": "FromImage"} for d in from_image]
    sizes = {d["lun"]: d.get("diskSizeGB", 30) for d in from_image}
    for data in storage.get("dataDisks") or []:
        option = data.get("createOption")
        if option not in ("Empty", "FromImage"):
            raise ArmError(400, "InvalidParameter", f"Data disk createOption '{option}' is not supported here.")
        if option == "Empty" and not data.get("diskSizeGB"):
            raise ArmError(400, "InvalidParameter", "An empty data disk needs 'diskSizeGB'.")
        if option == "FromImage" and data["lun"] not in sizes:
            raise ArmError(400, "InvalidParameter", f"The image has no data disk at LUN {data['lun']}.")
        data.setdefault("name", f"{vm.name}_DataDisk_{data['lun']}_{uuid.uuid4().hex}")
        data.setdefault("caching", "None")
        data.setdefault("deleteOption", "Detach")
        managed = data.setdefault("managedDisk", {})
        managed.setdefault("storageAccountType", "Standard_LRS")
        managed["id"] = f"{'/'.join(vm.id.split('/')[:5])}/providers/Microsoft.Compute/disks/{data['name']}"
        data["diskSizeGB"] = data.get("diskSizeGB") or sizes[data["lun"]]
        arm.store.add(
            Resource(
                managed["id"],
                DISKS,
                {"location": vm.envelope["location"], "tags": {}, "sku": {"name": managed["storageAccountType"]}},
                {
                    "diskSizeGB": data["diskSizeGB"],
                    "creationData": {"createOption": option},
                    "provisioningState": "Succeeded",
                    "timeCreated": now(),
                },
            )
        )


_SECURITY_TYPES = ("Standard", "TrustedLaunch", "ConfidentialVM")


def security_type(vm: Resource) -> str:
    """A VM's security type; Standard when its profile names none."""
    return (vm.properties.get("securityProfile") or {}).get("securityType") or "Standard"


def _set_security_type(arm: ArmEmulator, vm: Resource, image: dict[str, Any], existing: Resource | None) -> None:
    if existing is not None:  # fixed at create
        vm.properties["securityProfile"] = existing.properties.get("securityProfile")
        return
    given = (vm.properties.get("securityProfile") or {}).get("securityType")
    generation = image_generation(arm, image)
    if given is None and generation == "V2":
        vm.properties["securityProfile"] = {
            "securityType": "TrustedLaunch",
            "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True},
        }
    elif given is not None and given not in _SECURITY_TYPES:
        raise ArmError(400, "InvalidParameter", f"The value '{given}' of parameter 'securityType' is not valid.")
    elif given in ("TrustedLaunch", "ConfidentialVM") and generation != "V2":
        raise ArmError(
            400, "InvalidParameter", f"The security type '{given}' is supported only for Hyper-V generation 2 images."
        )


def image_generation(arm: ArmEmulator, image: dict[str, Any]) -> str:
    """The Hyper-V generation of what a VM is made from: a managed image, a gallery version, a marketplace image."""
    if image.get("id"):
        source = arm.store.find(image["id"])
        if source is not None and source.type == IMAGE_VERSIONS:
            source = arm.store.find(source.id.rsplit("/versions/", 1)[0])
        return str((source.properties if source is not None else {}).get("hyperVGeneration") or "V1")
    entry = catalogue_entry(
        arm.platform_images, image.get("publisher", ""), image.get("offer", ""), image.get("sku", "")
    )
    return entry.hyper_v_generation if entry is not None else "V1"


def _check_plan(arm: ArmEmulator, vm: Resource, image: dict[str, Any]) -> None:
    """A VM made from a marketplace image that has a purchase plan must name that plan."""
    entry = catalogue_entry(
        arm.platform_images, image.get("publisher", ""), image.get("offer", ""), image.get("sku", "")
    )
    if entry is None or entry.plan is None:
        return
    given = {k: str(v).lower() for k, v in (vm.envelope.get("plan") or {}).items()}
    if any(given.get(k) != str(v).lower() for k, v in entry.plan.items()):
        raise ArmError(
            400,
            "VMMarketplaceInvalidInput",
            "Creating a virtual machine from Marketplace image or a custom image sourced from a "
            "Marketplace image requires Plan information in the request. "
            f"VM: '{vm.id}'.",
        )


def _boot_guest(arm: ArmEmulator, vm: Resource) -> None:
    if arm.guest_factory is None:
        return
    os_profile = vm.properties.get("osProfile") or {}
    keys = ((os_profile.get("linuxConfiguration") or {}).get("ssh") or {}).get("publicKeys") or []
    spec = GuestSpec(
        vm_id=vm.id,
        name=vm.name,
        computer_name=os_profile.get("computerName"),
        os_type=vm.state["os_type"],
        admin_username=os_profile.get("adminUsername"),
        admin_password=vm.state.pop("admin_password", None),
        ssh_public_keys=tuple(k.get("keyData", "") for k in keys),
        image_reference=vm.properties["storageProfile"].get("imageReference") or {},
    )
    try:
        endpoint = arm.guest_factory(spec)
    except Exception as e:  # the VM's creation fails through its operation, as a boot failure does
        # A guest that can never start (non_retryable) is the image's fault, as Azure's client error says.
        code = "OSProvisioningClientError" if getattr(e, "non_retryable", False) else "OSProvisioningInternalError"
        with arm.lock:
            vm.state["boot_error"] = (code, f"The guest of VM '{vm.name}' failed to start: {e!r}")
        return
    with arm.lock:
        vm.state["guest"] = endpoint


def _finish_boot(arm: ArmEmulator, vm: Resource) -> None:
    """The create's operation ends as the guest's boot did."""
    if "boot_error" in vm.state:
        code, message = vm.state.pop("boot_error")
        raise ArmError(400 if code == "OSProvisioningClientError" else 500, code, message)
    if vm.state.get("power") == "starting":
        vm.state["power"] = "running"


def _parts_deleted_with(arm: ArmEmulator, vm: Resource) -> list[str]:
    """Parts created with deleteOption Delete go with the VM, as in ARM; NICs only if the VM ever took them."""
    storage = vm.properties.get("storageProfile", {})
    disks = [storage.get("osDisk", {}), *(storage.get("dataDisks") or [])]
    doomed = [d.get("managedDisk", {}).get("id") for d in disks if d.get("deleteOption") == "Delete"]
    if vm.state.get("nics_taken", True):
        doomed += [
            nic.get("id")
            for nic in vm.properties.get("networkProfile", {}).get("networkInterfaces", [])
            if (nic.get("properties") or {}).get("deleteOption") == "Delete"
        ]
    return [rid for rid in doomed if rid]


def _nics_of(arm: ArmEmulator, vm: Resource) -> list[Resource]:
    found = [
        arm.store.find(n.get("id", "")) for n in vm.properties.get("networkProfile", {}).get("networkInterfaces", [])
    ]
    return [nic for nic in found if nic is not None]


def _reserve_nics(arm: ArmEmulator, vm: Resource) -> None:
    for nic in _nics_of(arm, vm):
        nic.state["reserved_for"] = (vm.id, vm.properties["vmId"], time.monotonic() + arm.nic_reservation)


def _create_failed(arm: ArmEmulator, vm: Resource) -> None:
    """A VM whose create failed never took its NICs, which stay reserved for it."""
    vm.state["nics_taken"] = False
    _reserve_nics(arm, vm)


def _deleted(arm: ArmEmulator, vm: Resource) -> None:
    """The NICs a deleted VM leaves behind stay reserved for it."""
    _reserve_nics(arm, vm)


def nic_reserved_for(nic: Resource) -> tuple[str, str] | None:
    """The VM (its id and vmId) a NIC is reserved for now, or None."""
    reserved = nic.state.get("reserved_for")
    if reserved is None or time.monotonic() >= reserved[2]:
        return None
    return reserved[0], reserved[1]


def nic_reserved(arm: ArmEmulator, vm_id: str) -> ArmError:
    seconds = f"{arm.nic_reservation:g}"
    return ArmError(
        400,
        "NicReservedForAnotherVm",
        f"Nic(s) in request is reserved for another Virtual Machine for {seconds} seconds. Please provide another "
        f"nic(s) or retry after {seconds} seconds. Reserved VM: {vm_id}",
    )


def _close_guest(arm: ArmEmulator, vm: Resource) -> None:
    guest = vm.state.pop("guest", None)
    if guest is not None and guest.close is not None:
        guest.close()


def guest_host(vm: Resource | None) -> str:
    """The address a VM's NIC and public IP report: its guest's, else loopback."""
    guest = vm.state.get("guest") if vm is not None else None
    return guest.host if guest is not None else "127.0.0.1"


# ----------------------------------------------------------------- views


def _render(arm: ArmEmulator, vm: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    if expand == "instanceview":
        props["instanceView"] = _instance_view(vm)


def _instance_view(vm: Resource) -> dict[str, Any]:
    state = vm.properties["provisioningState"].lower()
    statuses = [
        {
            "code": f"ProvisioningState/{state}",
            "level": "Info" if state != "failed" else "Error",
            "displayStatus": f"Provisioning {state}",
            "time": vm.properties["timeCreated"],
        },
        {"code": f"PowerState/{vm.state['power']}", "level": "Info", "displayStatus": f"VM {vm.state['power']}"},
    ]
    if vm.state.get("generalized"):
        statuses.append({"code": "OSState/generalized", "level": "Info", "displayStatus": "VM generalized"})
    os_disk = vm.properties["storageProfile"]["osDisk"]
    return {
        "computerName": vm.state["computer_name"],
        "osName": vm.state["os_type"].lower(),
        "vmAgent": {
            "vmAgentVersion": "2.9.1.1",
            "statuses": [
                {
                    "code": "ProvisioningState/succeeded",
                    "level": "Info",
                    "displayStatus": "Ready",
                    "message": "GuestAgent is running and accepting new configurations.",
                }
            ],
        },
        "disks": [
            {
                "name": os_disk["name"],
                "statuses": [
                    {
                        "code": "ProvisioningState/succeeded",
                        "level": "Info",
                        "displayStatus": "Provisioning succeeded",
                    }
                ],
            }
        ],
        "statuses": statuses,
    }


def _instance_view_answer(arm: ArmEmulator, req: Request, vm: Resource) -> Response:
    return Response(200, _instance_view(vm))


# ----------------------------------------------------------------- actions


def _require_power(vm: Resource, action: str, *allowed: str) -> None:
    """Refuses `action` (409 OperationNotAllowed) unless the VM's power state is one of `allowed`."""
    if vm.state.get("power") not in allowed:
        raise operation_not_allowed(
            f"Operation '{action}' is not allowed on VM '{vm.name}' since the VM is "
            f"{vm.state.get('power')}; it must be {' or '.join(allowed)}."
        )


def _power_action(arm: ArmEmulator, req: Request, vm: Resource, during: str, after: str) -> Response:
    before = vm.state["power"]
    vm.state["power"] = during

    def succeed() -> None:
        vm.state["power"] = after
        return None

    def fail() -> None:
        vm.state["power"] = before

    return accept_action(arm, req, vm, succeed, fail)


def _start(arm: ArmEmulator, req: Request, vm: Resource) -> Response:
    if vm.state.get("generalized"):
        raise operation_not_allowed(f"Operation 'start' is not allowed on VM '{vm.name}' since the VM is generalized.")
    return _power_action(arm, req, vm, "starting", "running")


def _restart(arm: ArmEmulator, req: Request, vm: Resource) -> Response:
    _require_power(vm, "restart", "running")
    return _power_action(arm, req, vm, "starting", "running")


def _power_off(arm: ArmEmulator, req: Request, vm: Resource) -> Response:
    return _power_action(arm, req, vm, "stopping", "stopped")


def _deallocate(arm: ArmEmulator, req: Request, vm: Resource) -> Response:
    return _power_action(arm, req, vm, "deallocating", "deallocated")


def _generalize(arm: ArmEmulator, req: Request, vm: Resource) -> Response:
    _require_power(vm, "generalize", "stopped", "deallocated")
    vm.state["generalized"] = True
    return Response(200)  # synchronous: the SDK accepts only 200 here


def _run_command(arm: ArmEmulator, req: Request, vm: Resource) -> Response:
    _require_power(vm, "runCommand", "running")
    body = req.json()
    check_rest_shape(body, envelope=False)

    def succeed() -> dict[str, Any]:
        stdout, stderr = arm.run_command(vm.id, body)
        if body.get("commandId") == "RunPowerShellScript":
            return {
                "value": [
                    {
                        "code": "ComponentStatus/StdOut/succeeded",
                        "level": "Info",
                        "displayStatus": "Provisioning succeeded",
                        "message": stdout,
                    },
                    {
                        "code": "ComponentStatus/StdErr/succeeded",
                        "level": "Info",
                        "displayStatus": "Provisioning succeeded",
                        "message": stderr,
                    },
                ]
            }
        return {
            "value": [
                {
                    "code": "ProvisioningState/succeeded",
                    "level": "Info",
                    "displayStatus": "Provisioning succeeded",
                    "message": f"Enable succeeded: \n[stdout]\n{stdout}\n[stderr]\n{stderr}",
                }
            ]
        }

    return accept_action(arm, req, vm, succeed)


def _capture(arm: ArmEmulator, req: Request, vm: Resource) -> Response:
    if not vm.state.get("generalized"):
        raise operation_not_allowed(
            f"Capture operation cannot be completed because the VM '{vm.name}' is not generalized."
        )
    body = req.json()
    prefix = body.get("vhdPrefix", "vhd")
    container = body.get("destinationContainerName", "images")

    def succeed() -> dict[str, Any]:
        uri = f"https://emulated.blob.core.windows.net/system/Microsoft.Compute/Images/{container}/{prefix}-osDisk.{uuid.uuid4()}.vhd"
        return {
            "$schema": "http://schema.management.azure.com/schemas/2014-04-01-preview/VM_IP.json",
            "contentVersion": "1.0.0.0",
            "resources": [{"properties": {"storageProfile": {"osDisk": {"image": {"uri": uri}}}}}],
        }

    return accept_action(arm, req, vm, succeed)


# ----------------------------------------------------------------- managed run commands


def _prepare_run_command(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    vm = arm.store[res.key.rsplit("/runcommands/", 1)[0]]
    _require_power(vm, "runCommands", "running")
    res.state["vm_id"] = vm.id


def _run_managed_command(arm: ArmEmulator, res: Resource) -> None:
    """The run command's script runs when its create ends; its output is its instanceView."""
    source = res.properties.get("source") or {}
    stdout, stderr = arm.run_command(
        res.state["vm_id"],
        {
            "commandId": source.get("commandId", "RunShellScript"),
            "script": (source.get("script") or "").splitlines(),
            "parameters": res.properties.get("parameters") or [],
        },
    )
    res.state["instance_view"] = {
        "executionState": "Succeeded",
        "executionMessage": "",
        "exitCode": 0,
        "output": stdout,
        "error": stderr,
        "startTime": now(),
        "endTime": now(),
    }


def _render_run_command(
    arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str
) -> None:
    if expand == "instanceview":
        props["instanceView"] = res.state.get("instance_view") or {"executionState": "Running"}


TYPES = (
    ResourceType(
        VIRTUAL_MACHINES,
        "aao201",
        prepare=_prepare,
        ready=_finish_boot,
        failed=_create_failed,
        after_create=_boot_guest,
        render=_render,
        actions={
            "start": Action(_start),
            "restart": Action(_restart),
            "poweroff": Action(_power_off),
            "deallocate": Action(_deallocate),
            "generalize": Action(_generalize),
            "instanceview": Action(_instance_view_answer, method="GET"),
            "runcommand": Action(_run_command),
            "capture": Action(_capture),
        },
        deletes_along=_parts_deleted_with,
        deleted=_deleted,
        release=_close_guest,
    ),
    ResourceType(
        RUN_COMMANDS,
        "aao201",
        prepare=_prepare_run_command,
        ready=_run_managed_command,
        render=_render_run_command,
    ),
)
