"""The recorded-traffic check (tests/azure_live/recording.py) on traffic the emulator answers: a recording shows no
divergence from itself, and each kind of divergence from a doctored copy of it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from activities.clouds.azure import AzureCloud
from tests.arm_emulator import ArmEmulator
from tests.azure.environment import make_cloud
from tests.azure.test_azure_cloud import build_context
from tests.azure_live.recording import Recorder, diff, main, read, redact, shape


async def record_staging(arm: ArmEmulator, blob_account: str, path: Path) -> list[dict]:
    """What kiln's staging create and delete send, and what the emulator answers."""
    cloud: AzureCloud = make_cloud(
        arm.base_url, blob_account, secret=b"s" * 32, client_options={"per_retry_policies": [Recorder(path)]}
    )
    try:
        build = build_context()
        await cloud.create_staging(build)
        await cloud.delete_staging(build)
    finally:
        await cloud.close()
    return read(path)


def first(records: list[dict], method: str, needle: str, status: int | None = None) -> dict:
    return next(r for r in records if r["method"] == method and needle in r["url"] and status in (None, r["status"]))


async def test_a_recording_differs_from_a_doctored_copy_in_each_way_and_from_itself_in_none(
    arm: ArmEmulator, blob_account: str, tmp_path: Path
) -> None:
    records = await record_staging(arm, blob_account, tmp_path / "emulated.jsonl")
    account_put = first(records, "PUT", "/storageAccounts/")
    assert account_put["status"] == 202 and "location" in account_put["headers"]
    assert diff(records, records) == []

    live = copy.deepcopy(records)
    first(live, "PUT", "/storageAccounts/")["status"] = 200
    first(live, "PUT", "/storageAccounts/")["headers"]["azure-asyncoperation"] = "https://management.azure.com/x"
    group_get = first(live, "GET", "/resourcegroups/IT_", 200)
    group_get["response"]["properties"]["provisioningState"] = "Creating"
    result = first(live, "GET", "/Microsoft.Storage/locations/", 200)  # the created account
    del result["response"]["properties"]["primaryEndpoints"]
    found = diff(live, records)
    assert len(found) == 4, found
    assert any("storageaccounts/{name}" in f and "status [200] on Azure, [202] emulated" in f for f in found)
    assert any("header azure-asyncoperation on Azure only" in f for f in found)
    assert any("properties.primaryEndpoints" in f and "emulated only" in f for f in found)
    assert any("states Succeeded > Creating on Azure, Succeeded emulated" in f for f in found)

    live_file, emulated_file = tmp_path / "live.jsonl", tmp_path / "emulated-copy.jsonl"
    live_file.write_text("".join(json.dumps(r) + "\n" for r in live))
    emulated_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["diff", str(live_file), str(emulated_file)]) == 1
    assert main(["diff", str(emulated_file), str(emulated_file)]) == 0


def test_a_recording_keeps_no_secret_and_no_sas_signature() -> None:
    body = {"accessSAS": "https://md.blob.storage.azure.net/x/abcd?sv=2018-03-28&sr=b&si=1&sig=s3cret"}
    body |= {"properties": {"osProfile": {"adminPassword": "hunter2"}, "uri": "https://a/b?sp=r&sig=s3cret&se=1"}}
    assert "s3cret" not in json.dumps(redact(body)) and "hunter2" not in json.dumps(redact(body))
    assert shape(redact(body)) == shape(body)
