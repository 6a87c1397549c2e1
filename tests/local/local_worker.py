"""A local-cloud worker in a process of its own, for tests that kill one: ``python -m tests.local.local_worker``.

It builds the same LocalCloud as ``worker.py`` from the environment: the state folder from ``KILN_HOME``, Azurite
from ``KILN_AZURITE_ENDPOINT``, Temporal from ``TEMPORAL_ADDRESS``, and serves ``KILN_TEST_TASK_QUEUE``; captured
images are boot-checked only if ``KILN_TEST_BOOT_CHECK`` is 1, as with ``worker.py --no-boot-check`` otherwise.
"""

from __future__ import annotations

import asyncio
import os
import signal

from activities.clouds.registry import CLOUDS, WorkerOptions
from activities.connection import connect
from worker import run_worker


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    client = await connect()
    cloud = await CLOUDS["local"].make(WorkerOptions(boot_check=os.environ.get("KILN_TEST_BOOT_CHECK") == "1"))
    try:
        await run_worker(client, cloud, task_queue=os.environ["KILN_TEST_TASK_QUEUE"], stop=stop)
    finally:
        await cloud.close()


if __name__ == "__main__":
    asyncio.run(main())
