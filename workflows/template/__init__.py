"""The AIB image template (Microsoft.VirtualMachineImages/imageTemplates), as strict pydantic models.

kiln takes a template exactly as AIB takes it, so the models describe AIB's newest API (2025-10-01), and
a template is read as its `apiVersion` says: from 2024-02-01 field names are matched case-sensitively and an
unknown field is an error that names the closest known field; before, as AIB did then, a field name matches
in any case and an unknown field (or one the version does not have yet) is dropped, with a warning. JSON
types are never coerced. What real templates carry beyond that is accepted as it is: the ARM envelope
(`type`, `apiVersion`, `name`, `dependsOn`...), read-only fields that GET returns (`exactVersion`,
`provisioningState`, `lastRunStatus`...), and `<placeholder>` strings from documentation templates
wherever a value has a format to check.

Every problem is reported at once. Cross-field rules (exactly one of `scriptUri`/`inline`, ...) are read
from the input beside pydantic's own field checks, so a template with a misspelled field and a rule
broken elsewhere gets both reported in one `TemplateError`, each with its AIB-style JSON path.

Where each part lives: `api_versions` (AIB's versions and what each changes), `formats` (value formats),
`base` (AibModel's strictness and cross-field rules), `source`, `steps`, `distribute`, `properties` and
`image_template` (the models, by part of the template), `errors` (AIB's wording and paths), `arm` (ARM
deployment wrappers and their expressions), `arm_functions` (the ARM template functions), `json_text`
(JSON as AIB and ARM read it) and `loading` (judging templates, files, JSON schema).

Nothing here does I/O at import or in `parse_template`: the package runs inside the workflow sandbox.
Only `load_template` reads files, and only when called.
"""

from workflows.template.api_versions import AIB_API_VERSIONS
from workflows.template.arm import DeploymentContext, resolve_arm_wrapper
from workflows.template.distribute import (
    Distributor,
    ManagedImageDistributor,
    SharedImageDistributor,
    TargetRegion,
    Versioning,
    VhdDistributor,
)
from workflows.template.errors import TemplateError, TemplateIssue
from workflows.template.image_template import ImageTemplate, destination_resource_group, is_windows_source
from workflows.template.loading import (
    CheckedTemplate,
    check_template,
    check_template_file,
    load_template,
    parse_template,
    template_json_schema,
)
from workflows.template.properties import TemplateProperties, VmProfile
from workflows.template.source import ManagedImageSource, PlatformImageSource, SharedImageVersionSource
from workflows.template.steps import (
    FileCustomizer,
    PowerShellCustomizer,
    ShellCustomizer,
    WindowsRestartCustomizer,
    WindowsUpdateCustomizer,
)

__all__ = [
    "AIB_API_VERSIONS",
    "CheckedTemplate",
    "DeploymentContext",
    "Distributor",
    "FileCustomizer",
    "ImageTemplate",
    "ManagedImageDistributor",
    "ManagedImageSource",
    "PlatformImageSource",
    "PowerShellCustomizer",
    "SharedImageDistributor",
    "SharedImageVersionSource",
    "ShellCustomizer",
    "TargetRegion",
    "TemplateError",
    "TemplateIssue",
    "TemplateProperties",
    "Versioning",
    "VhdDistributor",
    "VmProfile",
    "WindowsRestartCustomizer",
    "WindowsUpdateCustomizer",
    "check_template",
    "check_template_file",
    "destination_resource_group",
    "is_windows_source",
    "load_template",
    "parse_template",
    "resolve_arm_wrapper",
    "template_json_schema",
]
