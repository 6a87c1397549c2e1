"""kiln's ARM emulator for tests, and what the real Azure SDK clients need to talk to it.

Typical use::

    from azure.mgmt.compute import ComputeManagementClient
    from tests.arm_emulator import ArmEmulator, FakeCredential, client_kwargs

    with ArmEmulator() as arm:
        compute = ComputeManagementClient(FakeCredential(), SUBSCRIPTION, **client_kwargs(arm.base_url))

The `.aio` clients take `FakeAsyncCredential()` and the same `client_kwargs(base_url)`; they use azure-core's
default async transport (aiohttp), as kiln's worker does in production.
"""

from __future__ import annotations

from typing import Any

from azure.core.credentials import AccessToken
from azure.core.pipeline.policies import SansIOHTTPPolicy

from .blobs import AZURITE_ACCOUNT, AZURITE_KEY, Azurite, fixed_vhd
from .compute.platform_images import PlatformImage
from .compute.vm import GuestEndpoint, GuestSpec
from .protocol import ArmError, Call
from .rbac import Role
from .server import ArmEmulator

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "AllowHttp",
    "ArmEmulator",
    "ArmError",
    "Azurite",
    "Call",
    "FakeAsyncCredential",
    "FakeCredential",
    "GuestEndpoint",
    "GuestSpec",
    "PlatformImage",
    "Role",
    "client_kwargs",
    "fixed_vhd",
]

_FAR_FUTURE = 4102444800  # 2100-01-01: the token never needs refreshing during a test


class FakeCredential:
    """A token credential for the sync clients. The emulator accepts any bearer token; the token names the
    principal, whose role `ArmEmulator.roles` may set (any other principal is an Owner)."""

    def __init__(self, token: str = "fake") -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, _FAR_FUTURE)


class FakeAsyncCredential:
    """The same for the `.aio` clients, whose auth policy awaits get_token and closes the credential."""

    def __init__(self, token: str = "fake") -> None:
        self.token = token

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, _FAR_FUTURE)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> FakeAsyncCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


class AllowHttp(SansIOHTTPPolicy):
    """Lets the bearer-token policy send to http://127.0.0.1.

    azure-core refuses bearer tokens over plain http unless the *request* opts out; the client-level
    `enforce_https=False` is ignored. As a per-call policy this runs before authentication on every
    request, LRO polls included.
    """

    def on_request(self, request: Any) -> None:
        request.context["enforce_https"] = False


def client_kwargs(base_url: str, *, fast_retries: bool = True) -> dict[str, Any]:
    """Keyword arguments that point an azure-mgmt client (sync or `.aio`) at the emulator.

    `fast_retries` shrinks the exponential back-off between retries of 408/429/5xx answers
    without Retry-After (0 s, 1.6 s, 3.2 s by default) so tests of those stay short; the number of
    attempts and the honouring of Retry-After are unchanged. No transport is chosen: the sync clients
    use requests and the `.aio` ones aiohttp, the transports kiln runs on.
    """
    kwargs: dict[str, Any] = {"base_url": base_url, "per_call_policies": [AllowHttp()]}
    if fast_retries:
        kwargs["retry_backoff_factor"] = 0.01
    return kwargs
