"""The local cloud's storage service: an Azurite blob service with one storage account per local region.

Azurite speaks the Azure Blob REST protocol, so the local cloud's storage code is the azure-storage-blob code that
runs against Azure. Nothing is installed here: the ``azurite-blob`` executable comes from the project's
``node_modules`` (installed by ``make setup``) or from PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from azure.core.exceptions import AzureError
from azure.storage.blob.aio import BlobServiceClient

from activities.clouds.aib.ids import region_key
from activities.clouds.base import PermanentError

DEFAULT_ENDPOINT = "http://127.0.0.1:10000"

REGIONS = (
    "eastus",
    "eastus2",
    "westus2",
    "westus3",
    "centralus",
    "northeurope",
    "westeurope",
    "uksouth",
    "swedencentral",
    "southeastasia",
)

STAGING_ACCOUNT = "kilnstaging"

# One well-known key for every account, like Azurite's own devstoreaccount1 key: the emulator listens on loopback
# only, and a fixed key lets every process on the machine (worker, CLI, tests) reach it without sharing a secret.
ACCOUNT_KEY = "a2lsbi1sb2NhbC1henVyaXRlLWFjY291bnQta2V5LTAxMjM0NTY3ODlhYmNkZWY="

PID_FILE = "azurite.pid"
LOG_FILE = "azurite.log"


def account_for_region(region: str, *, field: str = "location") -> str:
    """The storage account that stands for ``region``; a region the local cloud lacks is a template error."""
    key = region_key(region)
    if key not in REGIONS:
        raise PermanentError(
            f"{field}: '{region}' is not a region of the local cloud; local regions: {', '.join(REGIONS)}",
            kind="LocationNotAvailable",
        )
    return f"kiln{key}"[:24]


def local_accounts() -> list[str]:
    """Every account the local Azurite serves: one per region, and the staging account."""
    return [STAGING_ACCOUNT, *(account_for_region(r) for r in REGIONS)]


def endpoint() -> str:
    """Where Azurite listens: ``$KILN_AZURITE_ENDPOINT`` (tests run their own on another port), else port 10000."""
    return os.environ.get("KILN_AZURITE_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def account_url(account: str, *, base: str | None = None) -> str:
    """Azurite addresses accounts path-style: ``http://127.0.0.1:10000/<account>``."""
    return f"{(base or endpoint()).rstrip('/')}/{account}"


def credential(account: str) -> dict[str, str]:
    return {"account_name": account, "account_key": ACCOUNT_KEY}


def find_azurite_blob() -> Path:
    """The ``azurite-blob`` executable: the project's ``node_modules`` first, then PATH."""
    local = Path(__file__).resolve().parents[3] / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return local
    if found := shutil.which("azurite-blob"):
        return Path(found)
    raise FileNotFoundError(
        "azurite-blob not found in node_modules/.bin or on PATH; install it with `make setup` "
        "(npm install --no-audit --no-fund azurite@3)"
    )


@dataclass
class Azurite:
    """A running Azurite blob service. ``owned`` is false when it was already running and this process reuses it."""

    endpoint: str
    location: Path
    pid: int
    owned: bool
    _process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    async def stop(self) -> None:
        """Stop Azurite if this process started it; one that was reused belongs to whoever started it.

        SIGTERM lets Azurite save its metadata database, which it otherwise writes only every few seconds.
        """
        if not self.owned or self._process is None or self._process.returncode is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._process.wait(), timeout=15)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        (self.location / PID_FILE).unlink(missing_ok=True)


async def answers(base: str) -> bool:
    """Whether kiln's Azurite answers at ``base``: the staging account accepts the fixed key."""
    client = BlobServiceClient(
        account_url(STAGING_ACCOUNT, base=base),
        credential=credential(STAGING_ACCOUNT),
        retry_total=0,
        connection_timeout=2,
        read_timeout=5,
    )
    try:
        async with client:
            await client.get_service_properties()
        return True
    except AzureError:
        return False


async def start_azurite(*, location: Path, port: int | None = None, host: str | None = None) -> Azurite:
    """Start Azurite on ``host:port`` with its data in ``location``, or reuse the one already answering there,
    so ``worker.py --dev`` and the demo share one. Host and port default to ``$KILN_AZURITE_ENDPOINT``'s
    (127.0.0.1:10000), where the storage code will look for it."""
    configured = urllib.parse.urlparse(endpoint())
    host = host or configured.hostname or "127.0.0.1"
    port = port or configured.port or 10000
    base = f"http://{host}:{port}"
    location.mkdir(parents=True, exist_ok=True)
    pid_file = location / PID_FILE
    if await answers(base):
        pid = int(pid_file.read_text()) if pid_file.exists() else 0
        return Azurite(endpoint=base, location=location, pid=pid, owned=False)

    env = dict(os.environ)
    env["AZURITE_ACCOUNTS"] = ";".join(f"{account}:{ACCOUNT_KEY}" for account in local_accounts())
    with open(location / LOG_FILE, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            str(find_azurite_blob()),
            "--blobHost",
            host,
            "--blobPort",
            str(port),
            "--location",
            str(location),
            "--disableTelemetry",  # otherwise it reports to an outside host
            "--skipApiVersionCheck",  # the SDK may be newer than the emulator
            "--loose",
            "--silent",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            # Its own session: a Ctrl-C meant for the worker must not kill it before the worker stops it cleanly.
            start_new_session=True,
        )
    azurite = Azurite(endpoint=base, location=location, pid=process.pid, owned=True, _process=process)
    deadline = asyncio.get_running_loop().time() + 60
    while not await answers(base):
        if process.returncode is not None or asyncio.get_running_loop().time() > deadline:
            await azurite.stop()
            tail = (location / LOG_FILE).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Azurite did not start on {base} (is the port taken?); its log ends:\n{tail}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), timeout=0.25)
    if process.returncode is not None:  # another process started one first and ours lost the port to it
        return Azurite(endpoint=base, location=location, pid=0, owned=False)
    pid_file.write_text(str(process.pid))
    return azurite
