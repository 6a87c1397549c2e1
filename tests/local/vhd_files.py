"""Sparse fixed VHDs for storage tests and benchmarks: raw disk bytes plus the 512-byte VHD footer, as capture makes."""

from __future__ import annotations

import struct
import time
import uuid
from pathlib import Path

PAGE = 512


def _geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track, by the algorithm in the VHD specification (appendix)."""
    sectors = min(size // 512, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def vhd_footer(size: int) -> bytes:
    cylinders, heads, spt = _geometry(size)
    footer = bytearray(
        struct.pack(
            ">8sIIQI4sI4sQQHBBII16sB",
            b"conectix",
            2,
            0x00010000,
            0xFFFFFFFFFFFFFFFF,  # fixed disks have no dynamic header
            int(time.time()) - 946684800,  # seconds since 2000-01-01
            b"kiln",
            0x00010000,
            b"Wi2k",
            size,
            size,
            cylinders,
            heads,
            spt,
            2,  # fixed
            0,
            uuid.uuid4().bytes,
            0,
        )
    )
    footer += bytes(PAGE - len(footer))
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
    return bytes(footer)


def write_vhd(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    """A fixed VHD of a ``size``-byte disk holding ``writes`` (offset -> bytes), sparse everywhere else."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
        f.seek(size)
        f.write(vhd_footer(size))
    return path


def used_pages(path: Path) -> int:
    """Bytes in the file's non-zero 512-byte pages, counted the slow obvious way."""
    zero = bytes(PAGE)
    total = 0
    with open(path, "rb") as f:
        while page := f.read(PAGE):
            total += PAGE if page != zero[: len(page)] else 0
    return total


def sent_pages(path: Path, merge_gap: int) -> int:
    """Bytes a page-blob upload writes: the non-zero pages, plus zero gaps shorter than ``merge_gap`` between
    two of them (sent inside one write), counted the slow obvious way."""
    zero = bytes(PAGE)
    total = gap = 0
    seen_data = False
    with open(path, "rb") as f:
        while page := f.read(PAGE):
            if page != zero[: len(page)]:
                if seen_data and gap < merge_gap:
                    total += gap
                total += PAGE
                gap, seen_data = 0, True
            else:
                gap += PAGE
    return total
