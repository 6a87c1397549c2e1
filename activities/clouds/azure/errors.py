"""Which ARM failures retrying cannot fix, and how they are reported.

A missing quota or role does not come back by itself, so such a failure fails the step at once (the saga then
cleans up) with a message that says what to ask for; so does an operation ARM does not allow at all (say, a managed
image of a TrustedLaunch VM). Everything else is left to the activity's retry policy: ARM's conflicts, throttling
and server errors mostly pass. (Deletes retry the conflicts of a resource still in use themselves, ``vm.py``.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from azure.core.exceptions import HttpResponseError

from activities.clouds.base import PermanentError

ROLE_HINT = "kiln's identity needs the role in deploy/azure-role.json (or the action named) on that scope"
_PERMISSION_CODES = {"AuthorizationFailed", "LinkedAuthorizationFailed", "RequestDisallowedByPolicy"}
_QUOTA_CODES = {"QuotaExceeded", "OperationNotAllowed", "SkuNotAvailable"}
# The guest OS itself failed to provision (its image cannot boot, or its agent never reported): a retry makes
# the same VM from the same image and fails the same way.
_GUEST_CODES = {"OSProvisioningClientError", "OSProvisioningTimedOut"}
# Deleting a resource another one still uses fails with these until ARM has caught up with the first delete.
IN_USE_CODES = {
    "InUseNetworkSecurityGroupCannotBeDeleted",
    "InUseSubnetCannotBeDeleted",
    "NicInUse",
    "NicReservedForAnotherVm",
    "PublicIPAddressCannotBeDeleted",
    "OperationNotAllowed",
    "AnotherOperationInProgress",
    "Conflict",
}


def error_code(err: HttpResponseError) -> str:
    return (err.error.code if err.error is not None else None) or ""


def error_message(err: HttpResponseError) -> str:
    return (err.error.message if err.error is not None else None) or err.message or str(err)


def permanent(err: HttpResponseError, *, what: str, needs: str) -> PermanentError | None:
    """The PermanentError for a quota, permission, guest or not-allowed failure, or None when retrying may help.

    ``what`` names the resource being made; ``needs`` the ARM action (or quota) the call needed.
    """
    code = error_code(err)
    message = error_message(err)
    if code == "QuotaExceeded" or (code in _QUOTA_CODES and "quota" in message.lower()):
        return PermanentError(
            f"{what}: the subscription's quota does not allow it ({code}: {message}). "
            f"Request a quota increase for {needs}, or choose a smaller vmSize.",
            kind="QuotaExceeded",
        )
    if code == "OperationNotAllowed":
        return PermanentError(f"{what}: Azure does not allow it ({code}: {message}).", kind="OperationNotAllowed")
    if code in _GUEST_CODES:
        return PermanentError(
            f"{what}: the guest OS failed to provision ({code}: {message}). The VM's boot diagnostics (serial "
            "log) say why.",
            kind="VmProvisioningFailed",
        )
    if code in _PERMISSION_CODES or err.status_code == 403:
        return PermanentError(
            f"{what}: permission denied ({code or err.status_code}: {message}). {ROLE_HINT}: {needs}.",
            kind="AuthorizationFailed",
        )
    return None


@asynccontextmanager
async def arm_call(what: str, *, needs: str) -> AsyncIterator[None]:
    """Turn a quota or permission failure inside the block into a PermanentError; let the rest through."""
    try:
        yield
    except HttpResponseError as err:
        failure = permanent(err, what=what, needs=needs)
        if failure is not None:
            raise failure from err
        raise
