"""The AIB template model: every real template is accepted, every broken one is explained at once."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.fixtures import CORPUS
from workflows.template import (
    ImageTemplate,
    ManagedImageSource,
    PlatformImageSource,
    SharedImageDistributor,
    ShellCustomizer,
    TargetRegion,
    TemplateError,
    TemplateIssue,
    destination_resource_group,
    is_windows_source,
    load_template,
    parse_template,
    resolve_arm_wrapper,
    template_json_schema,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
ARM_WRAPPERS = ["q1_armTemplateWinSIG.json", "s14_armTemplateWVD.json"]
ARM_PARAMETERS = {"imageTemplateName": "win-golden", "api-version": "2022-02-14", "svclocation": "westus2"}
SUBNET = "/subscriptions/0000/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/build/subnets/"


def corpus_files() -> list[str]:
    return sorted(p.name for p in CORPUS.glob("*.json"))


def plain_corpus() -> list[str]:
    return [name for name in corpus_files() if name not in ARM_WRAPPERS]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def fixture(name: str) -> dict:
    return read(FIXTURES / name)


def issues_of(raw: object, **kwargs: object) -> list[TemplateIssue]:
    with pytest.raises(TemplateError) as caught:
        parse_template(raw, **kwargs)  # type: ignore[arg-type]
    return caught.value.issues


def only_issue(raw: object) -> TemplateIssue:
    issues = issues_of(raw)
    assert len(issues) == 1, issues
    return issues[0]


# ---------------------------------------------------------------------------------------------
# The real templates


def test_the_corpus_is_all_there() -> None:
    assert len(corpus_files()) == 12, f"expected the twelve AIB templates in {CORPUS}"


@pytest.mark.parametrize("name", plain_corpus())
def test_every_plain_corpus_template_parses_unchanged(name: str) -> None:
    raw = read(CORPUS / name)
    template = parse_template(raw)
    assert template.location == raw["location"]
    assert [d.type for d in template.properties.distribute] == [d["type"] for d in raw["properties"]["distribute"]]
    assert [c.type for c in template.properties.customize] == [c["type"] for c in raw["properties"]["customize"]]


@pytest.mark.parametrize("name", ARM_WRAPPERS)
def test_arm_wrapper_parses_with_a_plain_parameters_dict(name: str) -> None:
    template = parse_template(read(CORPUS / name), parameters=ARM_PARAMETERS)
    assert template.name == "win-golden"
    assert template.api_version == "2022-02-14"
    assert template.location == "westus2"
    assert is_windows_source(template)


@pytest.mark.parametrize("name", ARM_WRAPPERS)
def test_arm_wrapper_parses_with_an_arm_parameters_file(name: str) -> None:
    body, template_name = load_template(CORPUS / name, FIXTURES / "arm_parameters.json")
    assert template_name == "win2019-golden"
    assert body["location"] == "westus2"
    assert body["properties"]["distribute"][0]["type"] == "SharedImage"
    assert "$schema" not in body


@pytest.mark.parametrize("name", ARM_WRAPPERS)
def test_arm_wrapper_without_parameters_names_each_field_and_missing_parameter(name: str) -> None:
    issues = issues_of(read(CORPUS / name))
    assert [i.path for i in issues] == ["resources[0].name", "resources[0].apiVersion", "resources[0].location"]
    for issue, parameter in zip(issues, ["imageTemplateName", "api-version", "svclocation"], strict=True):
        assert f"parameter '{parameter}' has no value" in issue.message
        assert f"[parameters('{parameter}')]" in issue.message


def test_corpus_quirks_are_kept_as_given() -> None:
    wrong_type = parse_template(read(CORPUS / "q1_helloImageTemplateforSIG.json"))
    assert wrong_type.type == "Microsoft.VirtualMachineImages"
    assert wrong_type.api_version == "2022-02-14"

    trigger = parse_template(read(CORPUS / "q9trig_helloImageTemplate.json"))
    assert trigger.type is None
    assert isinstance(trigger.properties.source, PlatformImageSource)
    assert trigger.properties.source.exact_version == "18.04.202210180"
    assert trigger.properties.customize[3].inline == [  # type: ignore[union-attr]
        "sudo mkdir /buildArtifacts",
        "\nsudo cp /tmp/index.html /buildArtifacts/index.html",
    ]

    no_identity = parse_template(read(CORPUS / "q4_helloImageTemplateVHD.json"))
    assert no_identity.identity is None
    assert no_identity.properties.distribute[0].run_output_name == "<runOutputName>"


@pytest.mark.parametrize("name", ["good_every_field.json", "good_windows.json"])
def test_templates_using_every_field_parse(name: str) -> None:
    parse_template(fixture(name))


def test_every_field_is_read_into_the_model() -> None:
    template = parse_template(fixture("good_every_field.json"))
    props = template.properties
    assert props.vm_profile.os_disk_size_gb == 64
    assert props.vm_profile.vnet_config is not None
    assert props.vm_profile.vnet_config.container_instance_subnet_id == SUBNET + "aci"
    assert props.validation is not None and len(props.validation.in_vm_validations) == 2
    assert props.optimize is not None and props.optimize.vm_boot is not None
    assert props.optimize.vm_boot.state == "Enabled"
    assert props.error_handling.on_customizer_error == "abort"
    assert props.additional_data_disks[0].size_gb == 32
    assert props.managed_resource_tags == {"cost-center": "42"}
    assert props.build_timeout.total_seconds() == 90 * 60
    gallery = props.distribute[1]
    assert isinstance(gallery, SharedImageDistributor)
    assert gallery.versioning is not None and gallery.versioning.major == 1
    assert [(r.name, r.replica_count, r.storage_account_type) for r in gallery.regions()] == [
        ("westeurope", 2, "Standard_ZRS"),
        ("northeurope", 1, "Standard_LRS"),
    ]


def test_legacy_replication_regions_carry_the_storage_account_type() -> None:
    gallery = parse_template(fixture("good_windows.json")).properties.distribute[0]
    assert isinstance(gallery, SharedImageDistributor)
    assert [(r.name, r.storage_account_type) for r in gallery.regions()] == [
        ("eastus2", "Premium_LRS"),
        ("westus2", "Premium_LRS"),
    ]


def test_empty_target_regions_mean_unset_as_in_aib() -> None:
    template = base()
    gallery(template).update(targetRegions=[], replicationRegions=["westeurope", "northeurope"])
    target = parse_template(template).properties.distribute[1]
    assert isinstance(target, SharedImageDistributor)
    assert [r.name for r in target.regions()] == ["westeurope", "northeurope"]


def test_build_timeout_zero_means_four_hours() -> None:
    template = parse_template(read(CORPUS / "q4_helloImageTemplateVHD.json"))
    assert template.properties.build_timeout.total_seconds() == 4 * 3600


# ---------------------------------------------------------------------------------------------
# One rule broken at a time


def base() -> dict:
    return copy.deepcopy(fixture("good_every_field.json"))


def props(t: dict) -> dict:
    return t["properties"]


def shell(t: dict) -> dict:
    return props(t)["customize"][0]


def gallery(t: dict) -> dict:
    return props(t)["distribute"][1]


def vnet(t: dict) -> dict:
    return props(t)["vmProfile"]["vnetConfig"]


def add_powershell(t: dict, **fields: object) -> None:
    props(t)["customize"].append({"type": "PowerShell", "inline": ["whoami"], **fields})


Case = tuple[str, Callable[[dict], object], str, list[str]]

CASES: list[Case] = [
    (
        "scriptUri and inline",
        lambda t: shell(t).update(inline=["echo"]),
        "properties.customize[0]",
        ["Exactly one of 'scriptUri' or 'inline'", "both"],
    ),
    (
        "neither scriptUri nor inline",
        lambda t: shell(t).pop("scriptUri"),
        "properties.customize[0]",
        ["Exactly one of 'scriptUri' or 'inline'", "neither"],
    ),
    (
        "validator without script",
        lambda t: props(t)["validate"]["inVMValidations"][0].pop("inline"),
        "properties.validate.inVMValidations[0]",
        ["Exactly one of 'scriptUri' or 'inline'", "neither"],
    ),
    (
        "runAsSystem without runElevated",
        lambda t: add_powershell(t, runAsSystem=True),
        "properties.customize[3].runAsSystem",
        ["'runAsSystem' can only be true when 'runElevated' is true"],
    ),
    (
        "replicationRegions and targetRegions",
        lambda t: gallery(t).update(replicationRegions=["westeurope"]),
        "properties.distribute[1]",
        ["'replicationRegions' and 'targetRegions' cannot both be given"],
    ),
    (
        "storageAccountType with targetRegions",
        lambda t: gallery(t).update(storageAccountType="Standard_LRS"),
        "properties.distribute[1].storageAccountType",
        ["only with 'replicationRegions'", "on each region"],
    ),
    (
        "storageAccountType not an allowed value",
        lambda t: gallery(t)["targetRegions"][0].update(storageAccountType="Premium_ZRS"),
        "properties.distribute[1].targetRegions[0].storageAccountType",
        ["bad value: 'Premium_ZRS'", "'Standard_LRS'", "'Standard_ZRS'", "'Premium_LRS'"],
    ),
    (
        "containerInstanceSubnetId without subnetId",
        lambda t: vnet(t).pop("subnetId"),
        "properties.vmProfile.vnetConfig.containerInstanceSubnetId",
        ["only together with 'subnetId'"],
    ),
    (
        "containerInstanceSubnetId same as subnetId",
        lambda t: vnet(t).update(containerInstanceSubnetId=SUBNET + "vms"),
        "properties.vmProfile.vnetConfig.containerInstanceSubnetId",
        ["different subnet from 'subnetId'"],
    ),
    (
        "containerInstanceSubnetId in another virtual network",
        lambda t: vnet(t).update(containerInstanceSubnetId=SUBNET.replace("/build/", "/other/") + "aci"),
        "properties.vmProfile.vnetConfig.containerInstanceSubnetId",
        ["same virtual network as 'subnetId'"],
    ),
    (
        "proxyVmSize with containerInstanceSubnetId",
        lambda t: vnet(t).update(proxyVmSize="Standard_A2_v2"),
        "properties.vmProfile.vnetConfig.proxyVmSize",
        ["must not be given with 'containerInstanceSubnetId'"],
    ),
    (
        "subnetId not a subnet id",
        lambda t: vnet(t).update(subnetId="vms"),
        "properties.vmProfile.vnetConfig.subnetId",
        ["Field 'subnetId' has a bad value: 'vms'", "subnet id"],
    ),
    (
        "buildTimeoutInMinutes 1 to 5",
        lambda t: props(t).update(buildTimeoutInMinutes=5),
        "properties.buildTimeoutInMinutes",
        ["bad value: 5", "client_jwt will expire within 5 minutes", "0", "6 to 960"],
    ),
    (
        "buildTimeoutInMinutes above 960",
        lambda t: props(t).update(buildTimeoutInMinutes=961),
        "properties.buildTimeoutInMinutes",
        ["bad value: 961", "at most 960"],
    ),
    (
        "buildTimeoutInMinutes negative",
        lambda t: props(t).update(buildTimeoutInMinutes=-1),
        "properties.buildTimeoutInMinutes",
        ["bad value: -1", "at least 0"],
    ),
    (
        "buildTimeoutInMinutes as a string",
        lambda t: props(t).update(buildTimeoutInMinutes="90"),
        "properties.buildTimeoutInMinutes",
        ["bad value: '90'", "whole number"],
    ),
    (
        "osDiskSizeGB negative",
        lambda t: props(t)["vmProfile"].update(osDiskSizeGB=-1),
        "properties.vmProfile.osDiskSizeGB",
        ["Field 'osDiskSizeGB' has a bad value: -1", "at least 0"],
    ),
    (
        "replicaCount zero",
        lambda t: gallery(t)["targetRegions"][1].update(replicaCount=0),
        "properties.distribute[1].targetRegions[1].replicaCount",
        ["bad value: 0", "at least 1"],
    ),
    (
        "major below -1",
        lambda t: gallery(t)["versioning"].update(major=-2),
        "properties.distribute[1].versioning.major",
        ["bad value: -2", "at least -1"],
    ),
    (
        "major with scheme Source",
        lambda t: gallery(t)["versioning"].update(scheme="Source"),
        "properties.distribute[1].versioning.major",
        ["only to scheme 'Latest'"],
    ),
    (
        "updateLimit negative",
        lambda t: props(t)["customize"].append({"type": "WindowsUpdate", "updateLimit": -1}),
        "properties.customize[3].updateLimit",
        ["bad value: -1", "at least 0"],
    ),
    (
        "restartTimeout not a duration",
        lambda t: props(t)["customize"].append({"type": "WindowsRestart", "restartTimeout": "5 minutes"}),
        "properties.customize[3].restartTimeout",
        ["bad value: '5 minutes'", "5m", "2h"],
    ),
    (
        "runOutputName with a space",
        lambda t: gallery(t).update(runOutputName="my output"),
        "properties.distribute[1].runOutputName",
        ["bad value: 'my output'", "1 to 64 letters, digits, '-', '_' or '.'"],
    ),
    (
        "runOutputName of 65 characters",
        lambda t: gallery(t).update(runOutputName="x" * 65),
        "properties.distribute[1].runOutputName",
        ["1 to 64"],
    ),
    (
        "runOutputName used twice",
        lambda t: gallery(t).update(runOutputName="managed"),
        "properties.distribute[1].runOutputName",
        ["'managed' is already used by distribute[0]"],
    ),
    (
        "runOutputName missing",
        lambda t: gallery(t).pop("runOutputName"),
        "properties.distribute[1].runOutputName",
        ["Missing field 'runOutputName'."],
    ),
    (
        "sha256Checksum too short",
        lambda t: props(t)["customize"][2].update(sha256Checksum="abc123"),
        "properties.customize[2].sha256Checksum",
        ["bad value: 'abc123'", "64 hex digits"],
    ),
    (
        "planInfo without planPublisher",
        lambda t: props(t)["source"]["planInfo"].pop("planPublisher"),
        "properties.source.planInfo.planPublisher",
        ["Missing field 'planPublisher'."],
    ),
    (
        "distribute empty",
        lambda t: props(t).update(distribute=[]),
        "properties.distribute",
        ["at least one distribution target", "ManagedImage, SharedImage, VHD"],
    ),
    (
        "distribute missing",
        lambda t: props(t).pop("distribute"),
        "properties.distribute",
        ["Missing field 'distribute'."],
    ),
    ("source missing", lambda t: props(t).pop("source"), "properties.source", ["Missing field 'source'."]),
    ("location missing", lambda t: t.pop("location"), "location", ["Missing field 'location'."]),
    (
        "publisher missing",
        lambda t: props(t)["source"].pop("publisher"),
        "properties.source.publisher",
        ["Missing field 'publisher'."],
    ),
    (
        "managed image source id",
        lambda t: props(t).update(source={"type": "ManagedImage", "imageId": "debian12"}),
        "properties.source.imageId",
        ["Field 'imageId' has a bad value: 'debian12'", "Microsoft.Compute/images"],
    ),
    (
        "gallery image version source id",
        lambda t: props(t).update(source={"type": "SharedImageVersion", "imageVersionId": "/subscriptions/0000"}),
        "properties.source.imageVersionId",
        ["Field 'imageVersionId' has a bad value", "/versions/"],
    ),
    (
        "gallery image id",
        lambda t: gallery(t).update(galleryImageId="golden/debian12"),
        "properties.distribute[1].galleryImageId",
        ["Field 'galleryImageId' has a bad value: 'golden/debian12'", "galleries/<gallery>/images/<definition>"],
    ),
    (
        "staging resource group name instead of id",
        lambda t: props(t).update(stagingResourceGroup="kiln-staging"),
        "properties.stagingResourceGroup",
        ["bad value: 'kiln-staging'", "resource group id"],
    ),
    (
        "unknown customizer type",
        lambda t: props(t)["customize"].append({"type": "Bash", "inline": ["echo"]}),
        "properties.customize[3].type",
        ["Unknown customizer type 'Bash'", "Shell, PowerShell, File, WindowsRestart, WindowsUpdate"],
    ),
    (
        "customizer without type",
        lambda t: shell(t).pop("type"),
        "properties.customize[0].type",
        ["Missing field 'type'.", "Shell, PowerShell, File, WindowsRestart, WindowsUpdate"],
    ),
    (
        "validator of a customizer-only type",
        lambda t: props(t)["validate"]["inVMValidations"].append({"type": "WindowsRestart"}),
        "properties.validate.inVMValidations[2].type",
        ["Unknown validator type 'WindowsRestart'", "Shell, PowerShell, File"],
    ),
    (
        "unknown distributor type",
        lambda t: gallery(t).update(type="Gallery"),
        "properties.distribute[1].type",
        ["Unknown distribution target type 'Gallery'", "ManagedImage, SharedImage, VHD"],
    ),
    (
        "unknown source type",
        lambda t: props(t)["source"].update(type="Marketplace"),
        "properties.source.type",
        ["Unknown source type 'Marketplace'", "PlatformImage, ManagedImage, SharedImageVersion"],
    ),
    (
        "enum value in the wrong case",
        lambda t: props(t)["optimize"]["vmBoot"].update(state="enabled"),
        "properties.optimize.vmBoot.state",
        ["bad value: 'enabled'", "'Enabled' or 'Disabled'", "case-sensitive"],
    ),
    (
        "errorHandling value",
        lambda t: props(t)["errorHandling"].update(onCustomizerError="keep"),
        "properties.errorHandling.onCustomizerError",
        ["bad value: 'keep'", "'cleanup' or 'abort'"],
    ),
    (
        "boolean given as a string",
        lambda t: add_powershell(t, runElevated="true"),
        "properties.customize[3].runElevated",
        ["bad value: 'true'", "true or false"],
    ),
    (
        "inline given as a string",
        lambda t: props(t)["customize"][1].update(inline="echo hi"),
        "properties.customize[1].inline",
        ["bad value: 'echo hi'", "must be a list"],
    ),
    (
        "field name in the wrong case",
        lambda t: props(t)["optimize"].update(vmboot=props(t)["optimize"].pop("vmBoot")),
        "properties.optimize.vmboot",
        ["Unknown field 'vmboot'", "did you mean 'vmBoot'?", "case-sensitive"],
    ),
    (
        "field name in snake_case",
        lambda t: props(t).update(vm_profile=props(t).pop("vmProfile")),
        "properties.vm_profile",
        ["Unknown field 'vm_profile'", "did you mean 'vmProfile'?", "camelCase"],
    ),
    (
        "validation instead of validate",
        lambda t: props(t).update(validation=props(t).pop("validate")),
        "properties.validation",
        ["Unknown field 'validation'", "did you mean 'validate'?"],
    ),
    (
        "unknown field with nothing close",
        lambda t: props(t)["vmProfile"].update(gpu=True),
        "properties.vmProfile.gpu",
        ["Unknown field 'gpu'", "Fields allowed here:", "vmSize", "osDiskSizeGB", "vnetConfig"],
    ),
    (
        "two user-assigned identities",
        lambda t: t["identity"]["userAssignedIdentities"].update({"/subscriptions/0000/other": {}}),
        "identity.userAssignedIdentities",
        ["Only one user-assigned identity", "2 are given"],
    ),
    (
        "apiVersion not a version",
        lambda t: t.update(apiVersion="latest"),
        "apiVersion",
        ["bad value: 'latest'", "2024-02-01"],
    ),
    (
        "template name with a slash",
        lambda t: t.update(name="team/golden"),
        "name",
        ["bad value: 'team/golden'", "1 to 64"],
    ),
    (
        "tag value not a string",
        lambda t: t["tags"].update(build=42),
        "tags.build",
        ["bad value: 42", "must be a string"],
    ),
    (
        "identity key that is not an identifier",
        lambda t: t["identity"].update(userAssignedIdentities={"/subscriptions/0000/x": {"secret": 1}}),
        "identity.userAssignedIdentities['/subscriptions/0000/x'].secret",
        ["Unknown field 'secret'"],
    ),
]


@pytest.mark.parametrize(("mutate", "path", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_broken_rule_is_reported_alone_at_its_path(
    mutate: Callable[[dict], object], path: str, words: list[str]
) -> None:
    template = base()
    mutate(template)
    issue = only_issue(template)
    assert issue.path == path
    for word in words:
        assert word in issue.message


def test_a_template_that_is_not_an_object() -> None:
    issue = only_issue([base()])
    assert issue.path == ""
    assert "JSON object" in issue.message


def test_paths_never_show_pydantic_internals() -> None:
    template = base()
    shell(template).update(inline=["echo"], bogus=1)
    gallery(template)["versioning"].update(scheme="Newest")
    for issue in issues_of(template):
        for internal in ("Shell", "SharedImage", "function-", "tagged-union", "[Shell]"):
            assert internal not in issue.path


# ---------------------------------------------------------------------------------------------
# Everything at once


def test_every_problem_is_reported_together() -> None:
    issues = issues_of(fixture("bad_many_problems.json"))
    assert sorted(i.path for i in issues) == sorted(
        [
            "properties.customize[0]",
            "properties.customize[1].type",
            "properties.customize[2].runAsSystem",
            "properties.distribute[1].runOutputName",
            "properties.distribute[2].runOutputName",
            "properties.distribute[2].imageId",
            "properties.vmProfile.osDiskSizeGB",
            "properties.buildTimeoutInMinutes",
        ]
    )


def test_a_rule_is_reported_beside_a_field_error_in_the_same_step() -> None:
    template = base()
    add_powershell(template, runAsSystem=True, runElevated="yes", scriptUri="https://example.org/x.ps1")
    paths = {i.path: i.message for i in issues_of(template)}
    assert "true or false" in paths["properties.customize[3].runElevated"]
    assert "both" in paths["properties.customize[3]"]
    assert "'runElevated' is true" in paths["properties.customize[3].runAsSystem"]


def test_unknown_field_suggests_the_closest_name() -> None:
    issue = only_issue(fixture("bad_unknown_field.json"))
    assert issue == TemplateIssue(
        path="properties.distribute[0].aritfactTags",
        message="Unknown field 'aritfactTags'; did you mean 'artifactTags'?",
    )


def test_error_text_has_one_aib_style_line_per_issue() -> None:
    with pytest.raises(TemplateError) as caught:
        parse_template(fixture("bad_many_problems.json"))
    lines = str(caught.value).splitlines()
    assert len(lines) == len(caught.value.issues) == 8
    assert "Validation failed: 'ImageTemplate.properties.distribute[2].runOutputName': " in str(caught.value)
    assert "Missing field 'runOutputName'." in str(caught.value)
    assert all(line.startswith("Validation failed: 'ImageTemplate.") for line in lines)


def test_template_error_survives_pickling() -> None:
    with pytest.raises(TemplateError) as caught:
        parse_template(fixture("bad_unknown_field.json"))
    again = pickle.loads(pickle.dumps(caught.value))
    assert again.issues == caught.value.issues
    assert str(again) == str(caught.value)


def test_models_built_in_python_still_check_rules() -> None:
    assert TargetRegion(name="westeurope", storage_account_type="Premium_LRS").replica_count == 1
    with pytest.raises(ValidationError, match="Exactly one of 'scriptUri' or 'inline'"):
        ShellCustomizer(type="Shell")


# ---------------------------------------------------------------------------------------------
# Files, ARM wrappers, JSON


def test_load_template_returns_the_plain_template_as_written() -> None:
    body, name = load_template(FIXTURES / "good_every_field.json")
    assert body == fixture("good_every_field.json")
    assert name == "debian12-golden"
    body, name = load_template(str(CORPUS / "q4_helloImageTemplateVHD.json"))
    assert name is None


def test_invalid_json_reports_file_line_and_column() -> None:
    with pytest.raises(TemplateError) as caught:
        load_template(FIXTURES / "bad_invalid_json.json")
    [issue] = caught.value.issues
    assert "bad_invalid_json.json" in issue.message
    assert "line 7, column 5" in issue.message


def test_invalid_parameters_file_reports_its_line(tmp_path: Path) -> None:
    broken = tmp_path / "params.json"
    broken.write_text('{"parameters": {\n  "svclocation": {"value": "westus2"\n}')
    with pytest.raises(TemplateError) as caught:
        load_template(CORPUS / ARM_WRAPPERS[0], broken)
    assert "params.json" in caught.value.issues[0].message
    assert "line 3" in caught.value.issues[0].message


def test_load_template_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "good_windows.json").read_bytes())
    body, _ = load_template(path)
    assert body["location"] == "eastus2"


def test_load_template_reports_template_problems() -> None:
    with pytest.raises(TemplateError) as caught:
        load_template(FIXTURES / "bad_unknown_field.json")
    assert caught.value.issues[0].path == "properties.distribute[0].aritfactTags"


def test_arm_expressions_are_resolved_everywhere() -> None:
    identity = "/subscriptions/0000/resourceGroups/id/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib"
    body, name = resolve_arm_wrapper(
        fixture("good_arm_expressions.json"), {"imageTemplateName": "debian", "IdentityId": identity}
    )
    assert name == "debian"
    assert body["location"] == "westeurope"  # defaultValue
    assert body["identity"]["userAssignedIdentities"] == {identity: {}}  # expression as a property name
    assert body["properties"]["buildTimeoutInMinutes"] == 120  # an int stays an int
    assert body["properties"]["source"]["offer"] == "debian-12"
    assert body["properties"]["customize"][0]["inline"] == ["sudo apt-get update", "sudo apt-get -y upgrade"]
    assert body["properties"]["customize"][1]["inline"] == ["[ -d /tmp ]"]  # '[[' escapes a literal '['
    distribute = body["properties"]["distribute"][0]
    assert distribute["runOutputName"] == "debian-gallery"
    assert distribute["galleryImageId"].endswith("/galleries/golden/images/debian12")
    assert distribute["targetRegions"] == [{"name": "westeurope"}]
    assert parse_template(body).properties.build_timeout_in_minutes == 120


def test_unresolvable_arm_expressions_are_all_named_with_their_paths() -> None:
    doc = fixture("good_arm_expressions.json")
    resource = doc["resources"][1]
    resource["properties"]["vmProfile"] = {"vmSize": "[resourceGroup().location]"}
    resource["tags"] = {"owner": "[variables('owner')]"}
    issues = issues_of(doc, parameters={"imageTemplateName": "debian"})
    by_path = {i.path: i.message for i in issues}
    assert set(by_path) == {
        "resources[1].identity.userAssignedIdentities",
        "resources[1].properties.vmProfile.vmSize",
        "resources[1].tags.owner",
    }
    assert "parameter 'identityId' has no value" in by_path["resources[1].identity.userAssignedIdentities"]
    assert (
        "resourceGroup().location needs the resource group's region: give --location"
        in (by_path["resources[1].properties.vmProfile.vmSize"])
    )
    assert "variable 'owner' is not declared" in by_path["resources[1].tags.owner"]


def test_arm_parameter_not_declared_in_the_template() -> None:
    doc = fixture("good_arm_expressions.json")
    doc["resources"][1]["properties"]["vmProfile"] = {"vmSize": "[parameters('vmSize')]"}
    [issue] = issues_of(doc, parameters={"imageTemplateName": "d", "identityId": "x"})
    assert issue.path == "resources[1].properties.vmProfile.vmSize"
    assert "parameter 'vmSize' is not declared" in issue.message


@pytest.mark.parametrize("count", [0, 2])
def test_arm_wrapper_needs_exactly_one_image_template(count: int) -> None:
    doc = read(CORPUS / ARM_WRAPPERS[0])
    doc["resources"] = doc["resources"] * count
    [issue] = issues_of(doc, parameters=ARM_PARAMETERS)
    assert issue.path == "resources"
    assert "exactly one Microsoft.VirtualMachineImages/imageTemplates" in issue.message
    assert f"has {count}" in issue.message


@pytest.mark.parametrize("name", [*plain_corpus(), "good_every_field.json", "good_windows.json"])
def test_json_round_trip_gives_the_same_template(name: str) -> None:
    raw = read(CORPUS / name) if (CORPUS / name).exists() else fixture(name)
    template = parse_template(raw)
    dumped = json.loads(json.dumps(template.model_dump()))
    assert parse_template(dumped) == template
    assert parse_template(template.model_dump(exclude_none=True, exclude_defaults=True)) == template
    assert "osDiskSizeGB" in dumped["properties"]["vmProfile"]


# ---------------------------------------------------------------------------------------------
# JSON Schema and helpers


def test_schema_describes_the_template_by_json_names() -> None:
    schema = template_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["location", "properties"]
    defs = schema["$defs"]
    props_schema = defs["TemplateProperties"]["properties"]
    assert {"source", "customize", "validate", "distribute", "vmProfile", "buildTimeoutInMinutes"} <= set(props_schema)
    assert "osDiskSizeGB" in defs["VmProfile"]["properties"]
    assert "inVMValidations" in defs["Validation"]["properties"]
    assert props_schema["distribute"]["minItems"] == 1
    assert props_schema["buildTimeoutInMinutes"]["maximum"] == 960
    for field in ("source", "customize", "validate", "distribute", "buildTimeoutInMinutes"):
        assert props_schema[field]["description"]
    assert schema["properties"]["location"]["description"]
    assert defs["ShellCustomizer"]["additionalProperties"] is False
    json.dumps(schema)


def test_schema_is_valid_json_schema_that_accepts_the_corpus() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = template_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for name in plain_corpus():
        assert not list(validator.iter_errors(read(CORPUS / name))), name
    assert list(validator.iter_errors(fixture("bad_unknown_field.json")))


@pytest.mark.parametrize(
    ("name", "windows"),
    [
        ("q0_helloImageTemplateLinux.json", False),
        ("q0_helloImageTemplateWin.json", True),
        ("qvalW_validators_with_a_windows_image.json", True),
        ("q3_helloImageTemplateforReCustomization.json", False),
    ],
)
def test_is_windows_source_by_publisher(name: str, windows: bool) -> None:
    assert is_windows_source(parse_template(read(CORPUS / name))) is windows


def test_is_windows_source_by_windows_only_steps() -> None:
    template = parse_template(fixture("good_windows.json"))
    assert isinstance(template.properties.source, ManagedImageSource)
    assert is_windows_source(template)


def test_destination_resource_group_is_the_first_target_with_an_id() -> None:
    assert destination_resource_group(parse_template(fixture("good_every_field.json"))) == "images-rg"
    assert destination_resource_group(parse_template(fixture("good_windows.json"))) == "gallery-rg"
    only_vhd = parse_template(read(CORPUS / "q4_helloImageTemplateVHD.json"))
    assert destination_resource_group(only_vhd) == ""
    vhd_first = base()
    props(vhd_first)["distribute"].reverse()
    assert destination_resource_group(parse_template(vhd_first)) == "gallery-rg"


def test_parsed_template_is_an_image_template() -> None:
    assert isinstance(parse_template(base()), ImageTemplate)
