"""What a build does, read from its template: pure functions, with no workflow call and no I/O.

The workflow decides when each step runs; these say what each step is given, so tests call them directly.
"""

from __future__ import annotations

import re
from typing import Any

from temporalio.exceptions import ActivityError, FailureError

from workflows.models import (
    Artifact,
    BuildContext,
    BuildVm,
    GuestScriptRequest,
    ResolvedSource,
    StagedArtifact,
    Staging,
)
from workflows.template import (
    FileCustomizer,
    ImageTemplate,
    PowerShellCustomizer,
    ShellCustomizer,
    destination_resource_group,
)


def build_id_of(workflow_id: str, run_id: str) -> str:
    """A short, name-safe id, unique per run: every resource name of the build derives from it."""
    slug = re.sub(r"[^a-z0-9-]+", "-", workflow_id.lower()).strip("-")[:40] or "build"
    return f"{slug}-{run_id.replace('-', '')[:8]}"


def context_of(template: ImageTemplate, *, build_id: str, template_name: str, cloud: str) -> BuildContext:
    """What every activity of the build is told about it."""
    props = template.properties
    return BuildContext(
        build_id=build_id,
        template_name=template_name,
        location=template.location,
        cloud=cloud,
        tags=template.tags,
        managed_resource_tags=props.managed_resource_tags,
        staging_resource_group=props.staging_resource_group,
        destination_resource_group=destination_resource_group(template),
    )


def source_label(template: ImageTemplate) -> str:
    """The source as the build list shows it: ``publisher:offer:sku:version``, or the image id."""
    source = template.properties.source
    if source.type == "PlatformImage":
        return f"{source.publisher}:{source.offer}:{source.sku}:{source.version}"
    return source.image_id if source.type == "ManagedImage" else source.image_version_id


def guest_steps(template: ImageTemplate) -> list[tuple[str, Any]]:
    """Every customizer and validator with its JSON path, in the order they run."""
    steps: list[tuple[str, Any]] = [
        (f"properties.customize[{i}]", s) for i, s in enumerate(template.properties.customize)
    ]
    if template.properties.validation is not None:
        steps += [
            (f"properties.validate.inVMValidations[{i}]", s)
            for i, s in enumerate(template.properties.validation.in_vm_validations)
        ]
    return steps


WORKLOAD_FIELD = "properties.optimize.workload"


def workload_of(template: ImageTemplate, source: ResolvedSource) -> ShellCustomizer | PowerShellCustomizer | None:
    """optimize.workload, when Enabled, as the script step it runs as on the source's OS: a Shell script on Linux,
    a PowerShell one (elevated, as AIB runs its own steps) on Windows."""
    optimize = template.properties.optimize
    workload = optimize.workload if optimize is not None else None
    if workload is None or workload.state != "Enabled" or not workload.script_uri:
        return None
    if source.os_type == "Windows":
        return PowerShellCustomizer(
            type="PowerShell",
            name="workload",
            script_uri=workload.script_uri,
            sha256_checksum=workload.sha256_checksum,
            run_elevated=True,
        )
    return ShellCustomizer(
        type="Shell", name="workload", script_uri=workload.script_uri, sha256_checksum=workload.sha256_checksum
    )


def artifacts_of(template: ImageTemplate) -> list[Artifact]:
    """Every scriptUri and sourceUri of the customizers and validators, in order, then the workload script."""
    artifacts = []
    for path, step in guest_steps(template):
        if isinstance(step, ShellCustomizer | PowerShellCustomizer) and step.script_uri:
            artifacts.append(
                Artifact(source_uri=step.script_uri, sha256=step.sha256_checksum, field=f"{path}.scriptUri")
            )
        elif isinstance(step, FileCustomizer):
            artifacts.append(
                Artifact(source_uri=step.source_uri, sha256=step.sha256_checksum, field=f"{path}.sourceUri")
            )
    optimize = template.properties.optimize
    workload = optimize.workload if optimize is not None else None
    if workload is not None and workload.state == "Enabled" and workload.script_uri:
        artifacts.append(
            Artifact(
                source_uri=workload.script_uri, sha256=workload.sha256_checksum, field=f"{WORKLOAD_FIELD}.scriptUri"
            )
        )
    return artifacts


def index_by_field(artifacts: list[Artifact], staged: list[StagedArtifact]) -> dict[str, StagedArtifact]:
    """Each staged artifact by the template field it came from (``properties.customize[1].scriptUri``)."""
    return {artifact.field: s for artifact, s in zip(artifacts, staged, strict=True)}


def guest_request(
    context: BuildContext,
    staging: Staging,
    vm: BuildVm,
    *,
    verb: str,
    path: str,
    steps: list[Any],
    index: int,
    staged_by_field: dict[str, StagedArtifact],
) -> GuestScriptRequest:
    """The request that runs ``steps[index]`` (a customizer, or a validator into validation.log) on ``vm``.

    Args:
        verb: ``customize`` or ``validate``, the start of the step's name.
        path: the JSON path of ``steps`` in the template.
        steps: the customizers, or the validators.
        index: which of ``steps`` to run.
        staged_by_field: the staged artifacts, as ``index_by_field()`` keys them.
    """
    step = steps[index]
    return GuestScriptRequest(
        build=context,
        staging=staging,
        vm=vm,
        index=index,
        label=f"{verb} {index + 1}/{len(steps)}: {step.name or step.type}",
        step=step,
        staged=staged_for(f"{path}[{index}]", staged_by_field),
        log_name="validation.log" if verb == "validate" else "customization.log",
    )


def workload_request(
    context: BuildContext,
    staging: Staging,
    vm: BuildVm,
    *,
    template: ImageTemplate,
    step: ShellCustomizer | PowerShellCustomizer,
    staged_by_field: dict[str, StagedArtifact],
) -> GuestScriptRequest:
    """The request that runs the workload script on the optimization VM, into customization.log after the
    customizers and the deprovision step (its index follows theirs, so its run is its own)."""
    return GuestScriptRequest(
        build=context,
        staging=staging,
        vm=vm,
        index=len(template.properties.customize) + 1,
        label="optimize workload",
        step=step,
        staged=staged_for(WORKLOAD_FIELD, staged_by_field),
    )


def staged_for(path: str, staged_by_field: dict[str, StagedArtifact]) -> list[StagedArtifact]:
    """The artifacts staged for the step at ``path`` (its scriptUri or sourceUri)."""
    return [s for field, s in staged_by_field.items() if field.rsplit(".", 1)[0] == path]


def cause_of(err: BaseException) -> str:
    """The message of the error at the bottom of a chain (ActivityError -> ApplicationError)."""
    while isinstance(err, ActivityError) and err.cause is not None:
        err = err.cause
    return str(err.message if isinstance(err, FailureError) else err)
