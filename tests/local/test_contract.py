"""The Cloud contract (``tests/cloud_contract.py``) on the local cloud: real VMs, real captures, Azurite storage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from activities.clouds.aib.tags import ROLE_TEMPORARY
from activities.clouds.local import LocalCloud
from activities.clouds.local.azurite import Azurite
from activities.clouds.local.records import ResourceStore
from activities.clouds.local.storage import LocalStorage
from tests.cloud_contract import CONTRACT, CONTRACT_IDS, CloudUnderTest
from tests.local.vms import TEST_HOME, debian_template
from workflows.models import BuildContext

pytestmark = pytest.mark.local


@pytest_asyncio.fixture
async def local_cloud(azurite: Azurite) -> AsyncIterator[LocalCloud]:
    # The test state folder, so the cached Debian base is used, with storage on the session's Azurite.
    store = ResourceStore(TEST_HOME / "resources.db")
    async with LocalStorage(store=store, endpoint=azurite.endpoint) as storage:
        yield LocalCloud(storage=storage, store=store, state=TEST_HOME)


@pytest.mark.parametrize("check", CONTRACT, ids=CONTRACT_IDS)
async def test_the_local_cloud_keeps_the_contract(check, local_cloud: LocalCloud) -> None:
    store = ResourceStore(TEST_HOME / "resources.db")

    async def leftovers(build: BuildContext) -> list[str]:
        records = await asyncio.to_thread(store.list, build_id=build.build_id)
        return [record.id for record in records if record.role == ROLE_TEMPORARY]

    await check(
        CloudUnderTest(
            cloud=local_cloud,
            template=debian_template(),
            unknown_source=debian_template(publisher="Canonical", offer="UbuntuServer", sku="18.04-LTS"),
            leftovers=leftovers,
        )
    )
