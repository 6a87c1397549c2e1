"""The build VM's size: the template's ``vmProfile.vmSize``, or AIB's default for the source's Hyper-V generation."""

from __future__ import annotations

DEFAULT_VM_SIZES = {"V1": "Standard_D1_v2", "V2": "Standard_D2ds_v4"}


def vm_size_for(vm_size: str, hyper_v_generation: str) -> str:
    """``vm_size``, or when it is empty AIB's default for a source of ``hyper_v_generation``."""
    return vm_size or DEFAULT_VM_SIZES[hyper_v_generation]
