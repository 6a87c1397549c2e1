"""Templates as AIB users really have them, each with AIB's verdict: accepted, accepted with a warning, or
refused with the path. What decides is the template's apiVersion (older versions drop what they do not know),
how ARM reads a deployment template (resource-level names in any case, what ARM consumes itself, template
functions, comments), and a few smaller rules."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.fixtures import CORPUS
from workflows.template import (
    AIB_API_VERSIONS,
    DeploymentContext,
    SharedImageDistributor,
    TemplateError,
    TemplateIssue,
    WindowsRestartCustomizer,
    check_template,
    check_template_file,
    template_json_schema,
)
from workflows.template.json_text import parse_json

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
ARM_PARAMETERS = {"imageTemplateName": "win-golden", "api-version": "2022-02-14", "svclocation": "westus2"}
CONTEXT = DeploymentContext(
    subscription_id="00000000-0000-0000-0000-000000000000", resource_group="images-rg", location="westeurope"
)


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def refusal(raw: object, **kwargs: object) -> dict[str, str]:
    with pytest.raises(TemplateError) as caught:
        check_template(raw, **kwargs)  # type: ignore[arg-type]
    return {issue.path: issue.message for issue in caught.value.issues}


def warnings_of(raw: object, **kwargs: object) -> dict[str, str]:
    return {w.path: w.message for w in check_template(raw, **kwargs).warnings}  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Every template accepted before is accepted as before


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.json")), ids=lambda p: p.name)
def test_every_corpus_template_is_accepted_without_a_warning(path: Path) -> None:
    raw = json.loads(path.read_text())
    checked = check_template(raw, parameters=ARM_PARAMETERS)
    assert checked.warnings == []
    assert checked.template.location in (raw.get("location"), "westus2")


@pytest.mark.parametrize("name", ["good_windows.json", "good_arm_expressions.json"])
def test_kiln_s_own_templates_are_accepted_without_a_warning(name: str) -> None:
    parameters = {"imageTemplateName": "debian", "identityId": "/subscriptions/0000/x"}
    assert check_template(fixture(name), parameters=parameters).warnings == []


# ---------------------------------------------------------------------------------------------
# 1. Strictness by apiVersion

OLDER_API_WARNINGS = {
    "properties.optimize.vmboot": "Field 'vmboot' is read as 'vmBoot': API version 2022-07-01 matches field names "
    "in any case, and so does kiln. From 2024-02-01 on, AIB refuses it (field names are case-sensitive).",
    "properties.errorHandling": "Field 'errorHandling' came in API version 2023-07-01: API version 2022-07-01 "
    "ignores it, and so does kiln. Set apiVersion to 2023-07-01 or later to use it.",
    "properties.distribute[0].aritfactTags": "Unknown field 'aritfactTags'; did you mean 'artifactTags'? API "
    "version 2022-07-01 ignores unknown fields, and so does kiln. From 2024-02-01 on, AIB refuses it.",
    "properties.distribute[1].tags": "Unknown field 'tags'. Fields allowed here: type, runOutputName, artifactTags, "
    "galleryImageId, replicationRegions, targetRegions, storageAccountType, excludeFromLatest, versioning, "
    "replicationMode. API version 2022-07-01 ignores unknown fields, and so does kiln. From 2024-02-01 on, AIB "
    "refuses it.",
}


def test_an_older_api_version_reads_names_in_any_case_and_drops_what_it_does_not_know() -> None:
    checked = check_template(fixture("warn_older_api.json"))
    assert {w.path: w.message for w in checked.warnings} == OLDER_API_WARNINGS
    props = checked.template.properties
    assert props.optimize is not None and props.optimize.vm_boot is not None
    assert props.optimize.vm_boot.state == "Enabled"  # read from 'vmboot'
    assert props.error_handling.on_customizer_error == "cleanup"  # 'abort' came in 2023-07-01: dropped
    assert props.distribute[0].artifact_tags == {}
    dumped = checked.template.model_dump(mode="json")
    assert "tags" not in dumped["properties"]["distribute"][1]


def test_from_2024_02_01_the_same_template_is_refused_at_each_path() -> None:
    template = fixture("warn_older_api.json")
    template["apiVersion"] = "2024-02-01"
    issues = refusal(template)
    assert set(issues) == {
        "properties.optimize.vmboot",
        "properties.distribute[0].aritfactTags",
        "properties.distribute[1].tags",
    }
    assert issues["properties.optimize.vmboot"] == (
        "Unknown field 'vmboot'; did you mean 'vmBoot'? Field names are case-sensitive."
    )


def test_a_field_newer_than_a_strict_api_version_is_refused_naming_its_version() -> None:
    template = fixture("good_every_field.json")
    template["apiVersion"] = "2024-02-01"
    issues = refusal(template)
    assert issues == {
        "properties.additionalDataDisks": "Unknown field 'additionalDataDisks' for API version 2024-02-01: "
        "it came in 2025-10-01.",
        "properties.optimize.workload": "Unknown field 'workload' for API version 2024-02-01: it came in 2025-10-01.",
        "properties.distribute[1].replicationMode": "Unknown field 'replicationMode' for API version 2024-02-01: "
        "it came in 2025-10-01.",
    }


def test_a_template_without_api_version_is_read_as_the_newest() -> None:
    template = fixture("good_every_field.json")
    del template["apiVersion"]
    checked = check_template(template)
    assert checked.warnings == []
    assert checked.template.properties.additional_data_disks[0].size_gb == 32


def test_an_api_version_aib_does_not_have_is_refused() -> None:
    template = fixture("good_every_field.json")
    template["apiVersion"] = "2024-02-02"
    issues = refusal(template)
    assert list(issues) == ["apiVersion"]
    assert "It must be an API version of AIB: 2018-02-01-preview" in issues["apiVersion"]
    assert AIB_API_VERSIONS[-1] == "2025-10-01"


# ---------------------------------------------------------------------------------------------
# 2, 3, 4. ARM deployment templates as ARM reads them


def bicep_style(**kwargs: object) -> object:
    return check_template_file(
        FIXTURES / "arm_bicep_style.json", FIXTURES / "arm_parameters_with_comments.json", **kwargs
    )


def test_an_arm_template_with_comments_resource_names_in_any_case_and_functions_is_accepted() -> None:
    checked = bicep_style(deployment=CONTEXT)
    assert checked.warnings == []
    assert checked.name == "debian.golden"
    body = checked.body
    # What ARM reads itself never reaches AIB: dependsOn (not even evaluated), condition, comments, metadata.
    assert set(body) == {"type", "apiVersion", "name", "location", "tags", "identity", "properties"}
    assert body["location"] == "westeurope"  # the parameter's default, [resourceGroup().location]
    assert body["tags"]["group"] == "images-rg"
    assert body["tags"]["suffix"] == "cwvxuqg24sifi"  # uniqueString as ARM computes it
    sub = "/subscriptions/00000000-0000-0000-0000-000000000000"
    assert body["identity"]["userAssignedIdentities"] == {
        f"{sub}/resourceGroups/images-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}
    }
    props = checked.template.properties
    assert props.build_timeout_in_minutes == 120
    assert props.vm_profile.vm_size == "Standard_D2ds_v4"
    assert props.customize[0].script_uri == "https://example.org/builds/scripts/setup.sh"  # type: ignore[union-attr]
    assert props.customize[1].inline == ["echo True True"]  # type: ignore[union-attr]
    gallery = props.distribute[0]
    assert isinstance(gallery, SharedImageDistributor)
    assert gallery.run_output_name == "Debian-Golden"
    assert gallery.gallery_image_id == (
        f"{sub}/resourceGroups/gallery-rg/providers/Microsoft.Compute/galleries/golden/images/debian12"
    )
    assert [(r.name, r.replica_count) for r in gallery.regions()] == [("westeurope", 2)]


def test_without_its_deployment_context_each_expression_is_named_with_its_path_and_option() -> None:
    with pytest.raises(TemplateError) as caught:
        bicep_style()
    issues = {issue.path: issue.message for issue in caught.value.issues}
    assert all(path.startswith("resources[1].") for path in issues)
    assert issues["resources[1].location"] == (
        "Cannot resolve [parameters('location')]: parameter 'location' has no value, and its defaultValue cannot be "
        "resolved: resourceGroup().location needs the resource group's region: give --location"
    )
    assert issues["resources[1].tags.group"] == (
        "Cannot resolve [resourceGroup().name]: resourceGroup().name needs the deployment's resource group: "
        "give --resource-group"
    )
    assert not any("dependsOn" in path or "reference" in message for path, message in issues.items())


def arm_doc() -> dict:
    """The Bicep-style ARM template, read as ARM reads it."""
    text = (FIXTURES / "arm_bicep_style.json").read_text()
    return parse_json(text, source="arm_bicep_style.json", comments_allowed=lambda _: True)


def test_a_condition_decides_which_image_template_is_deployed() -> None:
    doc = arm_doc()
    doc["parameters"]["deployTemplate"]["defaultValue"] = False
    issues = refusal(doc, parameters={"imageTemplateName": "x"}, deployment=CONTEXT)
    # Now the third resource is the one deployed, and it is no image template.
    assert set(issues) == {
        "resources[2].properties.not",
        "resources[2].properties.source",
        "resources[2].properties.distribute",
        "resources[2].location",
    }


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (lambda r: r.update(condition="[parameters('deployTemplate')]"), "resources", ["exactly one", "has 2"]),
        (lambda r: r.update(condition="yes"), "resources[2].condition", ["must be true or false, not 'yes'"]),
        (lambda r: r.update(condition=True, copy={"name": "c", "count": 0}), "", []),
        (lambda r: r.update(condition=True, copy={"name": "c", "count": -1}), "resources[2].copy.count", ["0 or more"]),
    ],
    ids=["two deployed", "condition not a boolean", "copy of none", "copy count negative"],
)
def test_what_arm_deploys_is_what_counts(change: object, path: str, words: list[str]) -> None:
    doc = arm_doc()
    change(doc["resources"][2])  # type: ignore[operator]
    if not path:  # the third resource is deployed no times: the second is the one
        assert check_template(doc, parameters={"imageTemplateName": "x"}, deployment=CONTEXT).name == "x"
        return
    issues = refusal(doc, parameters={"imageTemplateName": "x"}, deployment=CONTEXT)
    assert list(issues) == [path]
    for word in words:
        assert word in issues[path]


def test_child_resources_are_not_made_and_the_warning_says_so() -> None:
    doc = arm_doc()
    doc["resources"][1]["resources"] = [{"type": "triggers", "name": "source", "properties": {"kind": "SourceImage"}}]
    checked = check_template(doc, parameters={"imageTemplateName": "x"}, deployment=CONTEXT)
    assert [w.path for w in checked.warnings] == ["resources[1].resources"]
    assert "resources" not in checked.body


def test_model_errors_in_an_arm_template_are_at_their_path_in_the_file() -> None:
    doc = arm_doc()
    doc["resources"][1]["Properties"]["vmProfile"]["osDiskSizeGB"] = -1
    issues = refusal(doc, parameters={"imageTemplateName": "x"}, deployment=CONTEXT)
    assert list(issues) == ["resources[1].properties.vmProfile.osDiskSizeGB"]
    with pytest.raises(TemplateError, match=r"Validation failed: 'resources\[1\]\.properties\.vmProfile"):
        check_template(doc, parameters={"imageTemplateName": "x"}, deployment=CONTEXT)


# ---------------------------------------------------------------------------------------------
# 4. JSON as AIB and ARM read it


def written(tmp_path: Path, text: str, name: str = "template.json") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def only_issue_of(path: Path, parameters: Path | None = None) -> TemplateIssue:
    with pytest.raises(TemplateError) as caught:
        check_template_file(path, parameters)
    [issue] = caught.value.issues
    return issue


def test_a_comment_in_a_plain_template_is_refused_with_a_hint(tmp_path: Path) -> None:
    plain = json.dumps(fixture("good_windows.json"), indent=2)
    path = written(tmp_path, plain.replace('"location"', '// the region\n  "location"', 1))
    issue = only_issue_of(path)
    assert "invalid JSON at line 2, column 3" in issue.message
    assert "JSON has no comments" in issue.message
    assert "only ARM deployment templates and parameters files may have // and /* */ comments" in issue.message


def test_a_trailing_comma_is_refused_with_a_hint_naming_it() -> None:
    issue = only_issue_of(FIXTURES / "bad_invalid_json.json")
    assert "line 7, column 5" in issue.message
    assert "Remove the trailing comma at line 6, column 46: JSON allows no ',' before ']'." in issue.message


def test_a_trailing_comma_in_an_arm_template_is_named_at_its_place_in_the_file(tmp_path: Path) -> None:
    text = (FIXTURES / "arm_bicep_style.json").read_text().replace('"version": "latest"', '"version": "latest",')
    issue = only_issue_of(written(tmp_path, text))
    assert "Remove the trailing comma at line 60, column 30" in issue.message


def test_comments_do_not_reach_strings() -> None:
    checked = bicep_style(deployment=CONTEXT)
    assert checked.template.properties.customize[0].script_uri.startswith("https://")  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# 5. Smaller divergences


def every_field() -> dict:
    return copy.deepcopy(fixture("good_every_field.json"))


def test_a_checksum_in_upper_case_is_accepted_and_compared_in_lower_case() -> None:
    template = every_field()
    digest = template["properties"]["customize"][0]["sha256Checksum"]
    template["properties"]["customize"][0]["sha256Checksum"] = digest.upper()  # as Get-FileHash prints it
    assert check_template(template).template.properties.customize[0].sha256_checksum == digest  # type: ignore[union-attr]


def test_an_empty_restart_timeout_means_the_default() -> None:
    template = every_field()
    template["properties"]["customize"].append({"type": "WindowsRestart", "restartTimeout": ""})
    restart = check_template(template).template.properties.customize[-1]
    assert isinstance(restart, WindowsRestartCustomizer)
    assert restart.restart_timeout == "5m"


def test_a_gallery_target_without_regions_is_valid_from_2022_07_01() -> None:
    template = every_field()
    del template["properties"]["distribute"][1]["targetRegions"]
    gallery = check_template(template).template.properties.distribute[1]
    assert isinstance(gallery, SharedImageDistributor) and gallery.regions() == []


def test_before_2022_07_01_a_gallery_target_needs_replication_regions() -> None:
    template = fixture("warn_older_api.json")
    template["apiVersion"] = "2022-02-14"
    gallery = template["properties"]["distribute"][1]
    issues = refusal(template)
    assert issues["properties.distribute[1].replicationRegions"] == (
        "Missing field 'replicationRegions': API version 2022-02-14 requires it (from 2022-07-01 on, it is optional)."
    )
    gallery["replicationRegions"] = ["westeurope"]
    assert "properties.distribute[1].replicationRegions" not in warnings_of(template)


def test_a_template_without_identity_is_accepted_with_a_warning_on_azure_only() -> None:
    template = every_field()
    del template["identity"]
    assert warnings_of(template, cloud="local") == {}
    assert warnings_of(template, cloud="azure") == {
        "identity": "Missing field 'identity': AIB requires one from API version 2020-02-14 on and refuses the "
        "template without it. kiln builds it on Azure as its worker's own identity."
    }
    vhd = json.loads((CORPUS / "q4_helloImageTemplateVHD.json").read_text())  # 2020-02-14, with no identity
    assert list(warnings_of(vhd, cloud="azure")) == ["identity"]
    vhd["apiVersion"] = "2019-05-01-preview"  # before identities: nothing to warn about
    assert warnings_of(vhd, cloud="azure") == {}


# ---------------------------------------------------------------------------------------------
# The schema describes API 2025-10-01


def test_the_schema_describes_the_newest_api_and_when_each_field_came() -> None:
    schema = template_json_schema()
    defs = schema["$defs"]
    assert schema["properties"]["apiVersion"]["anyOf"][0]["enum"] == list(AIB_API_VERSIONS)
    disks = defs["TemplateProperties"]["properties"]["additionalDataDisks"]
    assert disks["description"].endswith("From API version 2025-10-01.")
    assert defs["DataDisk"]["properties"]["sizeGB"]["anyOf"][0]["minimum"] == 0
    assert "From API version 2025-10-01." in defs["Optimize"]["properties"]["workload"]["description"]
    assert set(defs["OptimizeWorkload"]["properties"]) == {"state", "scriptUri", "sha256Checksum"}
    mode = defs["SharedImageDistributor"]["properties"]["replicationMode"]
    assert mode["anyOf"][0]["enum"] == ["Full", "Shallow"]
    assert (
        "Required before API version 2022-07-01."
        in (defs["SharedImageDistributor"]["properties"]["replicationRegions"]["description"])
    )
    for field, since in (("autoRun", "2024-02-01"), ("errorHandling", "2023-07-01"), ("validate", "2022-02-14")):
        assert f"From API version {since}." in defs["TemplateProperties"]["properties"][field]["description"]
    assert {"vmBoot", "workload"} == set(defs["Optimize"]["properties"])
    validators = defs["Validation"]["properties"]["inVMValidations"]["items"]["oneOf"]
    assert {ref["$ref"].rsplit("/", 1)[-1] for ref in validators} >= {"FileValidator"}
    assert defs["FileValidator"]["description"].endswith("From API version 2022-07-01.")


def test_the_schema_accepts_every_field_of_the_newest_api() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(template_json_schema())
    assert not list(validator.iter_errors(every_field()))
