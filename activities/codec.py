"""Encrypted payloads: every workflow input, result, query answer, heartbeat and failure kiln's clients and workers
write to Temporal is sealed with AES-256-GCM, so a template's inline commands, URLs and secrets never reach the
history in plain text.

Keys come from ``KILN_CODEC_KEYS`` (an environment variable) or ``KILN_CODEC_KEY_FILE`` (a file, say a mounted
Kubernetes Secret): entries ``KEY_ID:BASE64_KEY``, separated by commas or new lines (``#`` starts a comment).
Each key is 32 bytes. The first entry seals new payloads; every entry opens the payloads sealed with it, so a key
is rotated by putting the new one first and dropping the old one once no open build's history needs it. The key
id travels in each payload's metadata. With neither setting, payloads stay plain, as Temporal writes them.

A payload written by someone without the key (``temporal workflow start --input-file``, the Web UI's form without
a codec endpoint) is plain and is read as it is.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEYS_VARIABLE = "KILN_CODEC_KEYS"
KEY_FILE_VARIABLE = "KILN_CODEC_KEY_FILE"
NONCE_BYTES = 12


class CodecKeyError(ValueError):
    """The configured keys cannot be read; the message names the setting and the entry."""


@dataclass(frozen=True)
class CodecKey:
    key_id: str
    key: bytes


def parse_keys(text: str, *, source: str) -> list[CodecKey]:
    """``KEY_ID:BASE64_KEY`` entries, the sealing key first; ``source`` names where they came from in errors."""
    keys: list[CodecKey] = []
    for number, line in enumerate(text.splitlines(), start=1):
        for entry in line.split("#", 1)[0].split(","):
            entry = entry.strip()
            if not entry:
                continue
            key_id, sep, encoded = entry.partition(":")
            where = f"{source}, line {number}, entry {key_id.strip() or entry[:8]!r}"
            if not sep or not key_id.strip():
                raise CodecKeyError(f"{where}: expected KEY_ID:BASE64_KEY")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except binascii.Error as err:
                raise CodecKeyError(f"{where}: the key is not base64 ({err})") from err
            if len(key) != 32:
                raise CodecKeyError(f"{where}: an AES-256 key is 32 bytes, this one is {len(key)}")
            if any(k.key_id == key_id.strip() for k in keys):
                raise CodecKeyError(f"{where}: key id {key_id.strip()!r} is given twice")
            keys.append(CodecKey(key_id.strip(), key))
    return keys


def keys_from_environment(environ: dict[str, str] | None = None) -> list[CodecKey]:
    """The keys ``KILN_CODEC_KEYS`` or ``KILN_CODEC_KEY_FILE`` give (the variable wins); none when neither is set."""
    environ = dict(os.environ) if environ is None else environ
    if text := environ.get(KEYS_VARIABLE, "").strip():
        return parse_keys(text, source=KEYS_VARIABLE)
    if path := environ.get(KEY_FILE_VARIABLE, "").strip():
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise CodecKeyError(f"{KEY_FILE_VARIABLE} {path}: {err.strerror}") from err
        keys = parse_keys(text, source=f"{KEY_FILE_VARIABLE} {path}")
        if not keys:
            raise CodecKeyError(f"{KEY_FILE_VARIABLE} {path}: the file holds no key")
        return keys
    return []


def new_key_entry(key_id: str) -> str:
    """A fresh ``KEY_ID:BASE64_KEY`` entry (``kiln codec-key``)."""
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over each whole payload (its metadata too), the key id in the sealed payload's metadata and
    bound to the ciphertext as associated data."""

    def __init__(self, keys: Sequence[CodecKey]) -> None:
        if not keys:
            raise CodecKeyError("an encryption codec needs at least one key")
        self._sealing = keys[0]
        self._ciphers = {k.key_id: AESGCM(k.key) for k in keys}

    @property
    def key_id(self) -> str:
        return self._sealing.key_id

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        cipher = self._ciphers[self._sealing.key_id]
        key_id = self._sealing.key_id.encode()
        sealed = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            data = nonce + cipher.encrypt(nonce, payload.SerializeToString(), key_id)
            sealed.append(Payload(metadata={"encoding": ENCODING, KEY_ID: key_id}, data=data))
        return sealed

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        opened = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                opened.append(payload)  # written without the key (the Temporal CLI, the UI's form): plain
                continue
            key_id = payload.metadata.get(KEY_ID, b"").decode()
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise CodecKeyError(
                    f"a payload is sealed with key {key_id!r}, which is not among the configured keys "
                    f"({', '.join(self._ciphers)}): add it to {KEYS_VARIABLE} or {KEY_FILE_VARIABLE}"
                )
            try:
                plain = cipher.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], key_id.encode())
            except InvalidTag as err:
                raise CodecKeyError(f"a payload sealed with key {key_id!r} does not open with that key") from err
            opened.append(Payload.FromString(plain))
        return opened


def codec_from_environment() -> EncryptionCodec | None:
    keys = keys_from_environment()
    return EncryptionCodec(keys) if keys else None
