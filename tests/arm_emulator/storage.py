"""Microsoft.Storage: storage accounts.

A PUT answers 202 with Location only; DELETE is synchronous; `listKeys` is a synchronous 200. Account names are
global, as in Azure. An account's blob endpoint is the blob service the emulator was given (see blobs.py), or the
emulator itself when it passes blob traffic on (see blob_proxy.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .protocol import ArmError, Request, Response, now
from .provider import Action, Provider, ResourceType
from .store import Resource

if TYPE_CHECKING:
    from .server import ArmEmulator

STORAGE_ACCOUNTS = "Microsoft.Storage/storageAccounts"


def _prepare_account(arm: ArmEmulator, res: Resource, existing: Resource | None) -> None:
    if not re.fullmatch(r"[a-z0-9]{3,24}", res.name):
        raise ArmError(
            400,
            "AccountNameInvalid",
            f"{res.name} is not a valid storage account name. Storage account name must be between 3 "
            "and 24 characters in length and use numbers and lower-case letters only.",
        )
    for other in arm.store:
        if other.type == res.type and other.name == res.name and other.key != res.key:
            raise ArmError(409, "StorageAccountAlreadyTaken", f"The storage account named {res.name} is already taken.")
    res.envelope.setdefault("kind", "StorageV2")
    res.envelope.setdefault("sku", {"name": "Standard_LRS", "tier": "Standard"})
    res.properties.setdefault("creationTime", existing.properties["creationTime"] if existing else now())


def _render_account(arm: ArmEmulator, res: Resource, out: dict[str, Any], props: dict[str, Any], expand: str) -> None:
    props["primaryEndpoints"] = {"blob": _blob_endpoint(arm, res.name)}
    props["primaryLocation"] = res.envelope.get("location")
    props["statusOfPrimary"] = "available"


def _blob_endpoint(arm: ArmEmulator, account: str) -> str:
    if arm.blob_proxy is not None:
        return arm.blob_proxy.endpoint(arm.base_url)
    blob, _ = arm.blobs.account_endpoint(account)
    return blob


def _list_keys(arm: ArmEmulator, req: Request, account: Resource) -> Response:
    _, key = arm.blobs.account_endpoint(account.name)
    return Response(
        200,
        {
            "keys": [
                {"keyName": "key1", "value": key, "permissions": "FULL"},
                {"keyName": "key2", "value": key, "permissions": "FULL"},
            ]
        },
    )


PROVIDER = Provider(
    types=(
        ResourceType(
            STORAGE_ACCOUNTS,
            "location",
            delete="sync",
            prepare=_prepare_account,
            render=_render_account,
            actions={"listkeys": Action(_list_keys)},
        ),
    ),
)
