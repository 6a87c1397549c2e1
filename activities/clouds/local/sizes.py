"""Azure VM sizes as CPU and memory limits for a local build VM, clamped to what this machine has."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from activities.clouds.aib.vm_sizes import vm_size_for
from activities.clouds.base import PermanentError

GIB = 1 << 30

# vCPUs and memory (GiB) of the sizes image builds commonly use.
KNOWN_SIZES: dict[str, tuple[int, float]] = {
    "standard_a1_v2": (1, 2),
    "standard_a2_v2": (2, 4),
    "standard_b1s": (1, 1),
    "standard_b1ms": (1, 2),
    "standard_b2s": (2, 4),
    "standard_b2ms": (2, 8),
    "standard_b4ms": (4, 16),
    "standard_d1_v2": (1, 3.5),
    "standard_d2_v2": (2, 7),
    "standard_d3_v2": (4, 14),
    "standard_ds1_v2": (1, 3.5),
    "standard_ds2_v2": (2, 7),
    "standard_d2s_v3": (2, 8),
    "standard_d4s_v3": (4, 16),
    "standard_d8s_v3": (8, 32),
    "standard_d2_v3": (2, 8),
    "standard_d4_v3": (4, 16),
    "standard_d2ds_v4": (2, 8),
    "standard_d4ds_v4": (4, 16),
    "standard_d2s_v4": (2, 8),
    "standard_d2s_v5": (2, 8),
    "standard_d4s_v5": (4, 16),
    "standard_d2ds_v5": (2, 8),
    "standard_d2as_v5": (2, 8),
    "standard_e2s_v3": (2, 16),
    "standard_e4s_v3": (4, 32),
    "standard_f2s_v2": (2, 4),
    "standard_f4s_v2": (4, 8),
}
# Memory per vCPU of a family, for sizes not in the table (Standard_D16s_v5 = 16 vCPUs x 4 GiB).
GIB_PER_VCPU = {"a": 2, "b": 4, "d": 4, "e": 8, "f": 2, "m": 28}
_SIZE_NAME = re.compile(r"standard_([a-z])[a-z]*?(\d+)[a-z]*(?:_v\d+)?")


@dataclass(frozen=True)
class VmLimits:
    size: str
    cpus: float
    memory_bytes: int


def limits_for(vm_size: str, hyper_v_generation: str) -> VmLimits:
    """The CPU and memory a size has on Azure, but never more than this machine has."""
    size = vm_size_for(vm_size, hyper_v_generation)
    key = size.lower()
    if key in KNOWN_SIZES:
        vcpus, gib = KNOWN_SIZES[key]
    elif match := _SIZE_NAME.fullmatch(key):
        family, vcpus = match[1], int(match[2])
        gib = vcpus * GIB_PER_VCPU.get(family, 4)
    else:
        raise PermanentError(
            f"properties.vmProfile.vmSize: '{vm_size}' is not an Azure VM size kiln knows (e.g. Standard_D2s_v3)",
            kind="InvalidVmSize",
        )
    machine_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return VmLimits(
        size=size,
        cpus=min(float(vcpus), float(os.cpu_count() or 1)),
        memory_bytes=min(int(gib * GIB), machine_memory),
    )
