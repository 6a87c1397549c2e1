"""The build VM's size (the template's ``vmProfile.vmSize``, or AIB's default for the source's Hyper-V
generation), its OS disk's (``vmProfile.osDiskSizeGB``, which can only grow the source's disk) and its data disks'
(``additionalDataDisks``, each an empty disk of its ``sizeGB``)."""

from __future__ import annotations

DEFAULT_VM_SIZES = {"V1": "Standard_D1_v2", "V2": "Standard_D2ds_v4"}


def vm_size_for(vm_size: str, hyper_v_generation: str) -> str:
    """``vm_size``, or when it is empty AIB's default for a source of ``hyper_v_generation``."""
    return vm_size or DEFAULT_VM_SIZES[hyper_v_generation]


def os_disk_too_small(os_disk_size_gb: int, source_bytes: int) -> str | None:
    """Why ``osDiskSizeGB`` cannot be used with a source whose disk is ``source_bytes``, or None when it can: Azure
    refuses an OS disk smaller than its image's (0 means the source's size)."""
    if os_disk_size_gb and source_bytes and os_disk_size_gb << 30 < source_bytes:
        return (
            f"properties.vmProfile.osDiskSizeGB: {os_disk_size_gb} GB is smaller than the source image's "
            f"{source_bytes >> 30} GB disk; it can only grow"
        )
    return None


def data_disk_without_size(sizes_gb: list[int | None]) -> str | None:
    """Why ``additionalDataDisks`` of these sizes (by LUN) cannot be made, or None when they can: an empty data disk
    needs a size, which the schema lets be 0 or absent."""
    for lun, size in enumerate(sizes_gb):
        if not size:
            return f"properties.additionalDataDisks[{lun}].sizeGB: an empty data disk needs a size of 1 GB or more"
    return None
