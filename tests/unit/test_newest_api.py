"""AIB's newest API (2025-10-01) and the fields before it that only some versions have: each with AIB's verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflows.template import TemplateError, check_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
MANAGED = "/subscriptions/0000/resourceGroups/images/providers/Microsoft.Compute/images/golden"
FILE_VALIDATOR = {"type": "File", "name": "check", "sourceUri": "https://example.org/c.sh", "destination": "/tmp/c.sh"}


def template(api_version: str | None = "2025-10-01", **properties: object) -> dict:
    body = json.loads((FIXTURES / "good_every_field.json").read_text())
    body["properties"] = {
        "source": {
            "type": "PlatformImage",
            "publisher": "Debian",
            "offer": "debian-12",
            "sku": "12",
            "version": "latest",
        },
        "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
        **properties,
    }
    if api_version is None:
        del body["apiVersion"]
    else:
        body["apiVersion"] = api_version
    return body


def refusal(raw: dict) -> dict[str, str]:
    with pytest.raises(TemplateError) as caught:
        check_template(raw)
    return {issue.path: issue.message for issue in caught.value.issues}


def test_a_file_validator_before_2022_07_01_is_refused_at_its_type() -> None:
    api_version = "2022-02-14"  # the first version with validate
    validate = {"inVMValidations": [{"type": "Shell", "inline": ["true"]}, FILE_VALIDATOR]}
    replication = {"distribute": [{"type": "VHD", "runOutputName": "vhd"}]}
    issues = refusal(template(api_version, validate=validate, **replication))
    assert issues == {
        "properties.validate.inVMValidations[1].type": f"Type 'File' is not one API version {api_version} has "
        "here: it came in 2022-07-01."
    }


@pytest.mark.parametrize("api_version", ["2022-07-01", "2024-02-01", None])
def test_a_file_validator_from_2022_07_01_is_accepted(api_version: str | None) -> None:
    checked = check_template(template(api_version, validate={"inVMValidations": [FILE_VALIDATOR]}))
    assert checked.warnings == []
    assert checked.template.properties.validation is not None
    assert checked.template.properties.validation.in_vm_validations[0].destination == "/tmp/c.sh"


def test_a_file_customizer_is_no_newer_than_the_api_itself() -> None:
    customize = [{**FILE_VALIDATOR, "name": "config"}]
    assert check_template(template("2020-02-14", customize=customize)).warnings == []


def test_the_newest_fields_are_built_on_every_cloud_with_no_warning() -> None:
    raw = template(
        additionalDataDisks=[{"sizeGB": 32}],
        optimize={"workload": {"state": "Enabled", "scriptUri": "https://example.org/w.sh"}},
    )
    for cloud in (None, "local", "azure"):
        assert check_template(raw, cloud=cloud).warnings == []


def test_an_enabled_workload_needs_its_script() -> None:
    issues = refusal(template(optimize={"workload": {"state": "Enabled"}}))
    assert issues == {"properties.optimize.workload.scriptUri": "'scriptUri' is needed when 'state' is Enabled."}


def test_vm_boot_optimization_of_an_image_over_2_tb_is_refused() -> None:
    big = {"osDiskSizeGB": 4096}
    issues = refusal(template(optimize={"vmBoot": {"state": "Enabled"}}, vmProfile=big))
    assert issues == {
        "properties.optimize.vmBoot.state": "VM boot optimization takes images of up to 2048 GB; "
        "vmProfile.osDiskSizeGB is 4096."
    }
    assert check_template(template(optimize={"vmBoot": {"state": "Disabled"}}, vmProfile=big)).warnings == []
    assert check_template(template(optimize={"vmBoot": {"state": "Enabled"}}, vmProfile={"osDiskSizeGB": 2048}))
