"""The Cloud contract (``tests/cloud_contract.py``) on the recording cloud, the double every saga test drives."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cloud_contract import CONTRACT, CONTRACT_IDS, CloudUnderTest
from tests.fixtures.recording_cloud import UNKNOWN_PUBLISHER, RecordingCloud
from workflows.models import BuildContext
from workflows.template import parse_template


def template(publisher: str) -> dict:
    source = {"type": "PlatformImage", "publisher": publisher, "offer": "o", "sku": "s", "version": "latest"}
    return {
        "location": "westeurope",
        "properties": {"source": source, "distribute": [{"type": "VHD", "runOutputName": "v"}]},
    }


@pytest.mark.parametrize("check", CONTRACT, ids=CONTRACT_IDS)
async def test_the_recording_cloud_keeps_the_contract(check, tmp_path: Path) -> None:
    cloud = RecordingCloud(tmp_path / "cloud.db")

    async def leftovers(build: BuildContext) -> list[str]:
        return [id for _, id in cloud.alive(build_id=build.build_id)]

    await check(
        CloudUnderTest(
            cloud=cloud,
            template=parse_template(template("Debian")),
            unknown_source=parse_template(template(UNKNOWN_PUBLISHER)),
            leftovers=leftovers,
        )
    )
