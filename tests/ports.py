"""Loopback ports for the servers the tests and benches start."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_loopback_address(port: int) -> str:
    """A loopback address of its own (127.x.y.z) whose ``port`` nothing listens on: a test machine's address."""
    while True:
        address = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
        return address
