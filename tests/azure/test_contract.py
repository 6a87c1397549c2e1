"""The Cloud contract (``tests/cloud_contract.py``) on the Azure cloud: the real SDKs against the ARM emulator."""

from __future__ import annotations

from typing import Any

import pytest

from activities.clouds.azure import AzureCloud
from tests.arm_emulator import ArmEmulator
from tests.azure.environment import LOCATION, Guests, kiln_resources
from tests.cloud_contract import CONTRACT, CONTRACT_IDS, CloudUnderTest
from workflows.models import BuildContext
from workflows.template import parse_template


def template(**source: Any) -> dict:
    platform = {"type": "PlatformImage", "publisher": "Canonical", "offer": "UbuntuServer", "sku": "18.04-LTS"}
    return {
        "location": LOCATION,
        "properties": {"source": {**platform, **source}, "distribute": [{"type": "VHD", "runOutputName": "v"}]},
    }


@pytest.mark.parametrize("check", CONTRACT, ids=CONTRACT_IDS)
async def test_the_azure_cloud_keeps_the_contract(check, cloud: AzureCloud, arm: ArmEmulator, guests: Guests) -> None:
    guests.attach(arm)

    async def leftovers(build: BuildContext) -> list[str]:
        return [resource["id"] for resource in kiln_resources(arm, build.build_id)]

    await check(
        CloudUnderTest(
            cloud=cloud,
            template=parse_template(template()),
            unknown_source=parse_template(template(publisher="Nobody", offer="x", sku="y")),
            leftovers=leftovers,
        )
    )
