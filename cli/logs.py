"""Read a build's logs (customization.log, validation.log) wherever its cloud keeps them.

The status carries only the log's URI (logs never pass through workflow history), so the CLI reads the blob
itself: a file on this machine for test clouds, Azurite for the local cloud, Azure Blob Storage for Azure.
Every reader takes an offset, so following a log fetches only what is new.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname


async def read_log(uri: str, offset: int = 0) -> bytes:
    """The bytes of the log at ``uri`` from ``offset`` on; empty when nothing was written past ``offset``.

    Raises:
        FileNotFoundError: there is no log at ``uri`` (yet).
        ValueError: ``uri`` is of a kind kiln does not write.
    """
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return await asyncio.to_thread(_read_file, url2pathname(unquote(parts.path)), offset)
    if parts.scheme == "http" and _is_loopback(parts.hostname or ""):
        return await _read_azurite(uri, offset)
    if parts.scheme == "https" and (parts.hostname or "").endswith(".blob.core.windows.net"):
        return await asyncio.to_thread(_read_azure_blob, uri, offset)
    if parts.scheme in ("http", "https"):
        return await asyncio.to_thread(_read_http, uri, offset)
    raise ValueError(f"cannot read a log at {uri!r}: expected a file://, http:// or https:// URI")


def sibling_log(uri: str, name: str) -> str:
    """The URI of another log in the same folder, e.g. validation.log next to customization.log (keeps a SAS query)."""
    parts = urlsplit(uri)
    folder = parts.path.rsplit("/", 1)[0]
    return urlunsplit(parts._replace(path=f"{folder}/{name}"))


def _read_file(path: str, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _read_azurite(uri: str, offset: int) -> bytes:
    """Azurite needs the local cloud's account keys, which its admin module knows; without it, try a plain GET."""
    try:
        from activities.clouds.local.admin import read_log as read_local_log
    except ImportError:
        return await asyncio.to_thread(_read_http, uri, offset)
    if inspect.iscoroutinefunction(read_local_log):
        return await read_local_log(uri, offset)
    return await asyncio.to_thread(read_local_log, uri, offset)


def _read_http(uri: str, offset: int) -> bytes:
    request = urllib.request.Request(uri, headers={"Range": f"bytes={offset}-"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
            # A server that ignores Range sends the whole blob.
            return data if response.status == 206 else data[offset:]
    except urllib.error.HTTPError as err:
        if err.code == 416:  # nothing past offset yet
            return b""
        if err.code == 404:
            raise FileNotFoundError(f"no log at {uri}") from err
        if err.code in (401, 403):
            raise PermissionError(
                f"{uri} refused an anonymous read ({err.code}); reading it needs the storage key"
            ) from err
        raise


@functools.cache
def _azure_credential() -> Any:
    """One credential per process: DefaultAzureCredential may shell out to ``az`` for each new token."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _read_azure_blob(uri: str, offset: int) -> bytes:
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
    from azure.storage.blob import BlobClient

    # A SAS URI carries its own authorization.
    credential = None if "sig=" in urlsplit(uri).query else _azure_credential()
    blob = BlobClient.from_blob_url(uri, credential=credential)
    try:
        return blob.download_blob(offset=offset).readall()
    except ResourceNotFoundError as err:
        raise FileNotFoundError(f"no log at {uri}") from err
    except HttpResponseError as err:
        if err.status_code == 416:
            return b""
        raise
    finally:
        blob.close()
