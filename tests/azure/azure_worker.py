"""An Azure-cloud worker in a process of its own, for tests that kill one: ``python -m tests.azure.azure_worker``.

It builds the test environment's AzureCloud (``environment.make_cloud``) against the test's ARM emulator at
``KILN_ARM_ENDPOINT``, with Azurite's account ``KILN_LOG_ACCOUNT`` for logs and the deployment secret
``KILN_WORKER_SECRET`` (hex, the same for every worker of a build: the VMs' keys derive from it); it serves
``KILN_TEST_TASK_QUEUE`` on Temporal at ``TEMPORAL_ADDRESS``, reaching guests as the in-process test workers do
(``environment.os_profiles``). SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import os
import signal

from activities.connection import connect
from tests.azure.environment import make_cloud, os_profiles
from worker import run_worker


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    client = await connect()
    cloud = make_cloud(
        os.environ["KILN_ARM_ENDPOINT"],
        os.environ["KILN_LOG_ACCOUNT"],
        secret=bytes.fromhex(os.environ["KILN_WORKER_SECRET"]),
    )
    try:
        await run_worker(client, cloud, task_queue=os.environ["KILN_TEST_TASK_QUEUE"], guests=os_profiles(), stop=stop)
    finally:
        await cloud.close()


if __name__ == "__main__":
    asyncio.run(main())
