"""The Azure SDK clients one worker uses: async management clients for ARM and blob clients for storage data.

Every client talks to ARM at ``arm_endpoint`` (the public cloud, a sovereign cloud, or a local emulator) with a
token for that endpoint's scope. Blob data goes with Entra tokens by default, never with shared keys; the blob
credential is a constructor argument so tests can hand in a storage emulator's account key, which is the only
thing such an emulator accepts.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.mgmt.compute.aio import ComputeManagementClient
from azure.mgmt.network.aio import NetworkManagementClient
from azure.mgmt.resource.resources.aio import ResourceManagementClient
from azure.mgmt.storage.aio import StorageManagementClient
from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient

PUBLIC_ARM = "https://management.azure.com"
# ARM sends Retry-After on most operations; this is only the pace when it does not (the SDK's own is 30 s).
# Every poll is a read that counts against the subscription's per-provider throttling, and builds poll for hours.
POLLING_INTERVAL = 15
# Throttling (429) and server errors are retried by azure-core's RetryPolicy, sleeping exactly what Retry-After
# asks; a few more attempts than the default 4 ride out a throttled subscription without failing the step.
RETRY_OPTIONS: dict[str, Any] = {"retry_total": 8, "retry_status": 6, "retry_backoff_max": 60}


class AllowLoopbackHttp(SansIOHTTPPolicy):
    """Lets bearer tokens go over plain http, which azure-core refuses unless each request opts out. Only ever
    added for an ARM endpoint on a loopback address (an emulator), never for a remote one."""

    def on_request(self, request: Any) -> None:
        request.context["enforce_https"] = False


def is_loopback_http(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


class ArmClients:
    """The four async management clients of one subscription, built once per worker and shared by its builds."""

    def __init__(
        self,
        credential: Any,
        subscription_id: str,
        *,
        arm_endpoint: str = PUBLIC_ARM,
        options: dict[str, Any] | None = None,
    ) -> None:
        endpoint = arm_endpoint.rstrip("/")
        kwargs: dict[str, Any] = {
            "base_url": endpoint,
            # The token's audience is the endpoint itself: management.azure.com, a sovereign cloud's, an emulator's.
            "credential_scopes": [f"{endpoint}/.default"],
            "polling_interval": POLLING_INTERVAL,
            **RETRY_OPTIONS,
        }
        if is_loopback_http(endpoint):
            kwargs["per_call_policies"] = [AllowLoopbackHttp()]
        kwargs.update(options or {})
        kwargs["base_url"] = endpoint
        self.subscription_id = subscription_id
        self.resource = ResourceManagementClient(credential, subscription_id, **kwargs)
        self.network = NetworkManagementClient(credential, subscription_id, **kwargs)
        self.compute = ComputeManagementClient(credential, subscription_id, **kwargs)
        self.storage = StorageManagementClient(credential, subscription_id, **kwargs)

    async def close(self) -> None:
        for client in (self.resource, self.network, self.compute, self.storage):
            await client.close()


def split_blob_url(url: str) -> tuple[str, str, str]:
    """``(account_url, container, blob)`` of a blob URL, path-style (an emulator on an IP) or host-style (Azure)."""
    parts = urlsplit(url)
    segments = parts.path.lstrip("/").split("/")
    host = parts.hostname or ""
    path_style = host == "localhost" or host.replace(".", "").isdigit()
    if path_style:
        account, segments = segments[0], segments[1:]
        account_url = f"{parts.scheme}://{parts.netloc}/{account}"
    else:
        account_url = f"{parts.scheme}://{parts.netloc}"
    if not segments or not segments[0]:
        raise ValueError(f"'{url}' names no blob container")
    return account_url, segments[0], "/".join(segments[1:])


class BlobClients:
    """Blob service clients per account, sharing one connection pool each."""

    def __init__(self, credential: Any) -> None:
        self._credential = credential
        self._services: dict[str, BlobServiceClient] = {}

    def service(self, account_url: str) -> BlobServiceClient:
        key = account_url.rstrip("/")
        if key not in self._services:
            self._services[key] = BlobServiceClient(key, credential=self._credential)
        return self._services[key]

    def container(self, url: str) -> ContainerClient:
        account_url, container, _ = split_blob_url(url.rstrip("/") + "/")
        return self.service(account_url).get_container_client(container)

    def blob(self, url: str) -> BlobClient:
        account_url, container, name = split_blob_url(url)
        return self.service(account_url).get_blob_client(container, name)

    async def close(self) -> None:
        for service in self._services.values():
            await service.close()
        self._services.clear()
