"""Managed images: made from a generalized VM, or from an OS disk, snapshot or blob named in storageProfile.

A source must be in the image's region (400 otherwise, as in ARM), and a snapshot still being copied cannot be one.
A VM of security type TrustedLaunch or ConfidentialVM cannot be one (409 OperationNotAllowed, hashicorp/packer#13189).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import ArmError, operation_not_allowed, region_name
from ..provider import ResourceType
from ..store import Resource
from .disks import check_copied
from .names import IMAGES, VIRTUAL_MACHINES
from .vm import security_type

if TYPE_CHECKING:
    from ..server import ArmEmulator


def _prepare(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    sources = arm.store.check_refs(res.properties)
    check_copied(arm, sources)
    for source in sources:
        where = region_name(str(source.envelope.get("location", "")))
        if where != region_name(str(res.envelope["location"])):
            raise ArmError(
                400,
                "InvalidParameter",
                f"The source {source.id} is in region '{where}', the image in "
                f"'{region_name(str(res.envelope['location']))}': an image's source must be in its region.",
            )
    vm = next((s for s in sources if s.type == VIRTUAL_MACHINES), None)
    if vm is not None:
        if not vm.state.get("generalized"):
            raise operation_not_allowed(f"The source virtual machine '{vm.id}' must be generalized to create an image.")
        if security_type(vm) != "Standard":
            raise operation_not_allowed(
                f"Creation of managed images are not supported for virtual machine with {security_type(vm)} "
                "security type."
            )
        os_disk = vm.properties["storageProfile"]["osDisk"]
        res.properties["storageProfile"] = {
            "osDisk": {
                "osType": os_disk["osType"],
                "osState": "Generalized",
                "caching": "ReadWrite",
                "managedDisk": {"id": os_disk["managedDisk"]["id"]},
                "storageAccountType": os_disk["managedDisk"].get("storageAccountType", "Standard_LRS"),
                "diskSizeGB": 30,
            },
            # An image of a VM captures its data disks too, each at its LUN.
            "dataDisks": [
                {
                    "lun": d["lun"],
                    "managedDisk": {"id": d["managedDisk"]["id"]},
                    "caching": d.get("caching", "None"),
                    "diskSizeGB": d.get("diskSizeGB"),
                    "storageAccountType": d["managedDisk"].get("storageAccountType", "Standard_LRS"),
                }
                for d in vm.properties["storageProfile"].get("dataDisks") or []
            ],
            "zoneResilient": False,
        }
    elif not (res.properties.get("storageProfile") or {}).get("osDisk"):
        raise ArmError(400, "InvalidParameter", "An image needs sourceVirtualMachine or storageProfile.osDisk.")
    res.properties.setdefault("hyperVGeneration", "V1")


TYPES = (ResourceType(IMAGES, "aao201", prepare=_prepare),)
