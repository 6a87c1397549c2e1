"""A build VM's credentials, derived from the worker secret and the build id: SSH keys, and the Windows password.

Any worker on the machine can work out a build's keys again, so a worker that takes a build over after a crash
logs in to the VM the first one made, and no private key is ever stored or passed through workflow history.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Literal

import asyncssh
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

KeyRole = Literal["client", "host"]


def derive_key(secret: bytes, build_id: str, role: KeyRole) -> asyncssh.SSHKey:
    """The Ed25519 key of one build for one role: ``client`` logs in, ``host`` is the VM's sshd key.

    The role is part of the HMAC message, so the two keys of a build are unrelated to each other.
    """
    seed = hmac.new(secret, f"kiln/ssh/{role}/{build_id}".encode(), hashlib.sha256).digest()
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    return asyncssh.import_private_key(pem)


def public_line(key: asyncssh.SSHKey, comment: str = "") -> str:
    """The public key as one ``authorized_keys`` / ``known_hosts`` line: ``ssh-ed25519 AAAA... comment``."""
    line = key.export_public_key("openssh").decode().strip()
    return f"{line} {comment}" if comment else line


def private_openssh(key: asyncssh.SSHKey) -> bytes:
    """The private key in OpenSSH format, as sshd reads a ``HostKey`` file."""
    return key.export_private_key("openssh")


def windows_password(secret: bytes, build_id: str) -> str:
    """The build VM's admin password: derived like the SSH keys, so it is never stored or passed on."""
    token = base64.urlsafe_b64encode(hmac.new(secret, f"kiln/windows/{build_id}".encode(), hashlib.sha256).digest())
    return f"Kn1!{token.decode().rstrip('=')[:28]}"  # meets Azure's complexity rule whatever the digest is
