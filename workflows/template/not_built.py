"""Fields kiln reads but does not build yet: a template that uses one is accepted, as AIB accepts it, with a
warning that names the field and what the build does without it, so nothing is dropped silently.
"""

from __future__ import annotations

from workflows.template.errors import TemplateIssue, format_path
from workflows.template.image_template import ImageTemplate


def not_built(
    template: ImageTemplate, path: tuple[str | int, ...] = (), *, cloud: str | None = None
) -> list[TemplateIssue]:
    """A warning for each field of `template` that kiln does not build yet on `cloud` (None: on some cloud), at
    its path (under `path`)."""
    props = template.properties
    found: list[tuple[tuple[str | int, ...], str]] = []
    if props.additional_data_disks and cloud != "azure":
        found.append(
            (
                ("properties", "additionalDataDisks"),
                "kiln builds data disks on Azure only: on the local cloud the build VM gets none, and the image "
                "and its gallery versions have no data disk images.",
            )
        )
    return [TemplateIssue(path=format_path((*path, *loc)), message=message) for loc, message in found]
