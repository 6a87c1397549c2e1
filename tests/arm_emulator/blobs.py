"""Blob-side pieces of the ARM emulator: storage-account endpoints and disk export (VHD SAS).

ARM itself never moves blob data: a storage account's `primaryEndpoints.blob` and a disk's
`beginGetAccess` SAS URL point at the blob service. Here that blob service is either Azurite (the
real azure-storage-blob client then talks to it exactly as to Azure) or, when a test has no
Azurite, the emulator's own minimal read-only blob endpoint, which is enough to download an
exported VHD but not to write anything.
"""

from __future__ import annotations

import base64
import contextlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from tests.local.vhd_files import vhd_footer

from .protocol import Request, Response, error

# Azurite's documented development account; not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def fixed_vhd(data_size: int = 1024 * 1024) -> bytes:
    """A zero-filled fixed VHD: `data_size` bytes of disk and the 512-byte footer.

    Azure only accepts fixed VHDs whose virtual size is a whole number of MiB, so the default is
    the smallest image real tooling (qemu-img, Azure's own upload checks) takes as valid.
    """
    if data_size % (1024 * 1024):
        raise ValueError("a VHD for Azure must be a whole number of MiB")
    return bytes(data_size) + vhd_footer(data_size)


@dataclass
class Azurite:
    """Points storage accounts and disk exports at an Azurite blob service.

    Every storage account the emulator creates gets `blob_url` as its blob endpoint (Azurite serves
    one account unless started with AZURITE_ACCOUNTS), so containers are shared between accounts.
    Exported disks are uploaded as page blobs into `container` and handed out as read SAS URLs,
    the same shape as a real `beginGetAccess` answer.
    """

    blob_url: str
    account_name: str = AZURITE_ACCOUNT
    account_key: str = AZURITE_KEY
    container: str = "disk-exports"
    _uploaded: set[str] = field(default_factory=set)

    def account_endpoint(self, account: str) -> tuple[str, str]:
        return self.blob_url.rstrip("/") + "/", self.account_key

    def publish(self, name: str, data: bytes) -> str:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import (
            BlobSasPermissions,
            BlobServiceClient,
            generate_blob_sas,
        )

        service = BlobServiceClient(self.blob_url, credential=self.account_key)
        container = service.get_container_client(self.container)
        with contextlib.suppress(ResourceExistsError):
            container.create_container()
        blob = container.get_blob_client(name)
        if name not in self._uploaded:
            blob.upload_blob(data, blob_type="PageBlob", overwrite=True)
            self._uploaded.add(name)
        sas = generate_blob_sas(
            self.account_name,
            self.container,
            name,
            account_key=self.account_key,
            permission=BlobSasPermissions(read=True),
            expiry=datetime.now(UTC) + timedelta(hours=1),
        )
        return f"{blob.url}?{sas}"

    def unpublish(self, name: str) -> None:
        """Revoking access removes the export, so its SAS no longer reads; a later grant uploads it again. SAS
        expiry is not emulated."""
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient(self.blob_url, credential=self.account_key)
        with contextlib.suppress(ResourceNotFoundError):
            service.get_blob_client(self.container, name).delete_blob()
        self._uploaded.discard(name)


@dataclass
class ServedBlobs:
    """The fallback when no Azurite is given: exports are served read-only by the emulator.

    Storage accounts get an Azure-shaped blob endpoint that nothing answers, so uploads fail
    loudly instead of going anywhere; downloads of exported VHDs work with plain HTTP GET and
    with azure-storage-blob's BlobClient (ranged GETs).
    """

    base_url: str
    blobs: dict[str, bytes] = field(default_factory=dict)

    def account_endpoint(self, account: str) -> tuple[str, str]:
        key = base64.b64encode(account.encode().ljust(64, b"k")).decode()
        return f"https://{account}.blob.core.windows.net/", key

    def publish(self, name: str, data: bytes) -> str:
        token = uuid.uuid5(uuid.NAMESPACE_URL, name).hex
        self.blobs[token] = data
        return f"{self.base_url}/_blobs/{token}/abcd?sv=2018-03-28&sr=b&si={uuid.uuid4()}&sig=emulated"

    def unpublish(self, name: str) -> None:
        self.blobs.pop(uuid.uuid5(uuid.NAMESPACE_URL, name).hex, None)

    def answer(self, req: Request, token: str) -> Response:
        """A GET of `/_blobs/{token}/...` as the blob service answers a page blob: whole, a range, or its page list."""
        data = self.blobs.get(token)
        if data is None:
            return error(404, "BlobNotFound", "The specified blob does not exist.")
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{token}"',
            "Last-Modified": "Sat, 01 Jan 2000 00:00:00 GMT",
            "x-ms-blob-type": "PageBlob",
            "x-ms-version": "2021-08-06",
        }
        if req.query.get("comp") == "pagelist":
            # Page-blob downloads ask which pages hold data first; all of them do.
            xml = (
                f'<?xml version="1.0" encoding="utf-8"?><PageList><PageRange><Start>0</Start>'
                f"<End>{len(data) - 1}</End></PageRange></PageList>"
            ).encode()
            return Response(
                200, xml, {**headers, "Content-Type": "application/xml", "x-ms-blob-content-length": str(len(data))}
            )
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", req.range or "")
        if wanted is None:
            return Response(200, data, headers)
        start = int(wanted.group(1))
        end = min(int(wanted.group(2) or len(data) - 1), len(data) - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Response(206, data[start : end + 1], headers)
