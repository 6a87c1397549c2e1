"""What a Windows guest authenticates with: a self-signed listener certificate, and the accounts NTLM checks.

The certificate is made as ``New-SelfSignedCertificate`` makes one (its thumbprint is the SHA-1 of its DER form).
NTLM is checked by pyspnego's own acceptor, the same NTLM code the client side runs, which reads the accounts it
accepts from the file ``NTLM_USER_FILE`` names: one file for this process, an account per line.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_accounts_lock = threading.Lock()
_accounts_file: Path | None = None


@dataclass(frozen=True)
class ListenerCertificate:
    """A WinRM HTTPS listener's certificate and key, and what a client pins it by."""

    pem: bytes
    key_pem: bytes
    der: bytes

    @property
    def thumbprint(self) -> str:
        """As Windows shows it: the SHA-1 of the DER certificate, upper-case hex."""
        return hashlib.sha1(self.der).hexdigest().upper()

    @property
    def channel_binding(self) -> bytes:
        """RFC 5929 tls-server-end-point data: what an NTLM client over this TLS channel binds its login to."""
        return b"tls-server-end-point:" + hashlib.sha256(self.der).digest()

    def server_context(self, folder: Path) -> ssl.SSLContext:
        cert, key = folder / "listener.pem", folder / "listener.key"
        cert.write_bytes(self.pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        return context


def self_signed(computer_name: str) -> ListenerCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, computer_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(computer_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ListenerCertificate(
        pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        der=cert.public_bytes(serialization.Encoding.DER),
    )


def add_account(username: str, password: str) -> None:
    """Let NTLM accept ``username`` with ``password`` (a local account: no domain)."""
    global _accounts_file
    with _accounts_lock:
        if _accounts_file is None:
            handle, name = tempfile.mkstemp(prefix="kiln-ntlm-accounts-")
            os.close(handle)
            _accounts_file = Path(name)
            os.environ["NTLM_USER_FILE"] = name
        with _accounts_file.open("a") as accounts:
            accounts.write(f":{username}:{password}\n")
