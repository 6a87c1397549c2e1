"""The build plan read from a template: what each step is given, without a worker or a server."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.exceptions import ActivityError, ApplicationError, RetryState

from activities.clouds.registry import cloud_of
from workflows.models import BuildContext, BuildVm, StagedArtifact, Staging
from workflows.plan import (
    artifacts_of,
    build_id_of,
    cause_of,
    context_of,
    guest_request,
    guest_steps,
    index_by_field,
    source_label,
    staged_for,
)
from workflows.template import ImageTemplate, parse_template

SUB = "/subscriptions/0000/resourceGroups/images/providers/Microsoft.Compute"
SHA = "0" * 64


def template(**properties: Any) -> ImageTemplate:
    """Two customizers with artifacts around an inline one, a validator with a script, one VHD target."""
    return parse_template(
        {
            "location": "westeurope",
            "tags": {"team": "images"},
            "properties": {
                "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12"},
                "customize": [
                    {
                        "type": "Shell",
                        "name": "configure",
                        "scriptUri": "https://x/configure.sh",
                        "sha256Checksum": SHA,
                    },
                    {"type": "Shell", "inline": ["true"]},
                    {"type": "File", "name": "page", "sourceUri": "https://x/index.html", "destination": "/tmp/i.html"},
                ],
                "validate": {
                    "inVMValidations": [{"type": "Shell", "name": "check", "scriptUri": "https://x/check.sh"}]
                },
                "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
                "managedResourceTags": {"cost": "build"},
                **properties,
            },
        }
    )


def staged(uri: str) -> StagedArtifact:
    return StagedArtifact(source_uri=uri, staged_uri=f"{uri}.staged", sha256=SHA, size=1)


CONTEXT = BuildContext(build_id="b-1", template_name="golden", location="westeurope", cloud="local")
STAGING = Staging(resource_group_id="/rg", created_group=True, storage_uri="https://s", log_uri_prefix="https://s/l/")
VM = BuildVm(name="b-1-build", host="127.0.0.2", port=22, admin_user="kiln", host_key="ssh-ed25519 AAAA")


def test_the_build_id_is_a_name_safe_slug_of_the_workflow_id_and_the_run() -> None:
    assert build_id_of("My Golden_Image!", "0195-abcd-ef01-2345") == "my-golden-image-0195abcd"
    assert build_id_of("x" * 60, "12345678") == f"{'x' * 40}-12345678"
    assert build_id_of("!!!", "12345678") == "build-12345678"


def test_the_cloud_is_the_one_its_task_queue_serves() -> None:
    assert cloud_of("kiln-local") == "local"
    assert cloud_of("kiln-azure") == "azure"
    assert cloud_of("kiln-test-1234") == "kiln-test-1234"


def test_the_context_carries_the_templates_place_and_tags() -> None:
    context = context_of(template(), build_id="b-1", template_name="golden", cloud="local")
    assert context.location == "westeurope"
    assert context.tags == {"team": "images"}
    assert context.managed_resource_tags == {"cost": "build"}
    assert context.staging_resource_group is None
    assert (context.build_id, context.template_name, context.cloud) == ("b-1", "golden", "local")


@pytest.mark.parametrize(
    ("source", "label"),
    [
        (
            {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12"},
            "Debian:debian-12:12:latest",
        ),
        ({"type": "ManagedImage", "imageId": f"{SUB}/images/base"}, f"{SUB}/images/base"),
        (
            {"type": "SharedImageVersion", "imageVersionId": f"{SUB}/galleries/g/images/d/versions/1.0.0"},
            f"{SUB}/galleries/g/images/d/versions/1.0.0",
        ),
    ],
)
def test_the_source_label_names_the_image(source: dict[str, Any], label: str) -> None:
    assert source_label(template(source=source)) == label


def test_guest_steps_are_the_customizers_then_the_validators_with_their_paths() -> None:
    assert [path for path, _ in guest_steps(template())] == [
        "properties.customize[0]",
        "properties.customize[1]",
        "properties.customize[2]",
        "properties.validate.inVMValidations[0]",
    ]
    assert [path for path, _ in guest_steps(template(validate=None))][-1] == "properties.customize[2]"


def test_artifacts_are_every_script_and_source_uri_in_order() -> None:
    artifacts = artifacts_of(template())
    assert [(a.field, a.source_uri, a.sha256) for a in artifacts] == [
        ("properties.customize[0].scriptUri", "https://x/configure.sh", SHA),
        ("properties.customize[2].sourceUri", "https://x/index.html", ""),
        ("properties.validate.inVMValidations[0].scriptUri", "https://x/check.sh", ""),
    ]


def test_a_step_gets_only_its_own_staged_artifacts() -> None:
    artifacts = artifacts_of(template())
    by_field = index_by_field(artifacts, [staged(a.source_uri) for a in artifacts])
    assert [s.source_uri for s in staged_for("properties.customize[0]", by_field)] == ["https://x/configure.sh"]
    assert staged_for("properties.customize[1]", by_field) == []
    with pytest.raises(ValueError):
        index_by_field(artifacts, [])  # every artifact is staged, or the step that stages them failed


def test_a_customizer_request_names_the_step_and_logs_to_customization_log() -> None:
    props = template().properties
    artifacts = artifacts_of(template())
    by_field = index_by_field(artifacts, [staged(a.source_uri) for a in artifacts])
    first, unnamed = (
        guest_request(
            CONTEXT,
            STAGING,
            VM,
            verb="customize",
            path="properties.customize",
            steps=props.customize,
            index=index,
            staged_by_field=by_field,
        )
        for index in (0, 1)
    )
    assert (first.label, first.index, first.log_name) == ("customize 1/3: configure", 0, "customization.log")
    assert [s.source_uri for s in first.staged] == ["https://x/configure.sh"]
    assert unnamed.label == "customize 2/3: Shell"  # a step without a name is called by its type
    assert unnamed.staged == []


def test_a_validator_request_logs_to_validation_log() -> None:
    validation = template().properties.validation
    assert validation is not None
    request = guest_request(
        CONTEXT,
        STAGING,
        VM,
        verb="validate",
        path="properties.validate.inVMValidations",
        steps=validation.in_vm_validations,
        index=0,
        staged_by_field={},
    )
    assert (request.label, request.log_name) == ("validate 1/1: check", "validation.log")


def test_the_cause_is_the_message_at_the_bottom_of_the_chain() -> None:
    refused = ApplicationError("quota exceeded", type="QuotaExceeded", non_retryable=True)
    failed = ActivityError(
        "Activity task failed",
        scheduled_event_id=5,
        started_event_id=6,
        identity="worker",
        activity_type="create_vm",
        activity_id="3",
        retry_state=RetryState.NON_RETRYABLE_FAILURE,
    )
    failed.__cause__ = refused
    assert cause_of(failed) == "quota exceeded"
    assert cause_of(refused) == "quota exceeded"
    assert cause_of(ValueError("not a Temporal error")) == "not a Temporal error"
