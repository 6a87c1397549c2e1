"""Which output versions retention keeps: pure rules over the lineage of every template.

A template (or a gallery image definition) keeps its newest ``keep`` gallery versions; an older one stays too while another template still uses
it as a source (its current revision pins it, or its last build was made from it). Versions already deleted are
not counted, and neither are ones revoked: they are out of service already.
"""

from __future__ import annotations

from datetime import UTC, datetime

from workflows.golden_models import OutputLineage, RetentionRequest, TemplateLineage


def in_use_by_others(lineage: list[TemplateLineage], template: str) -> set[str]:
    """The versions templates other than ``template`` (every template, if empty) build from, by lower-cased id
    (Azure compares ids without case)."""
    used = set()
    for other in lineage:
        if other.name != template:
            used |= {source.lower() for source in (other.pinned_source, other.last_source) if source}
    return used


def versions_in_scope(lineage: list[TemplateLineage], request: RetentionRequest) -> list[OutputLineage]:
    """The gallery versions retention judges: the template's, or the image definition's, newest first."""
    if request.template:
        outputs = [o for t in lineage if t.name == request.template for o in t.outputs]
    else:
        prefix = request.image_definition.lower().rstrip("/") + "/versions/"
        outputs = [o for t in lineage for o in t.outputs if o.version_id.lower().startswith(prefix)]
    live = [o for o in outputs if o.type == "SharedImage" and (o.retired is None or o.retired.action == "end-of-life")]
    return sorted(live, key=lambda o: (o.made or datetime.min.replace(tzinfo=UTC), o.run), reverse=True)


def retention_plan(lineage: list[TemplateLineage], request: RetentionRequest) -> tuple[list[str], list[str], list[str]]:
    """(kept, kept because in use, to retire): version ids, newest first in each list."""
    newest_first = versions_in_scope(lineage, request)
    kept = [o.version_id for o in newest_first[: request.keep]]
    used = in_use_by_others(lineage, request.template)
    older = newest_first[request.keep :]
    in_use = [o.version_id for o in older if o.version_id.lower() in used]
    # A version already dated is not dated again; with delete, it goes like the rest.
    going = [o.version_id for o in older if request.action == "delete" or o.retired is None]
    return kept, in_use, [v for v in going if v not in in_use]


def descendants(lineage: list[TemplateLineage], version_id: str) -> list[str]:
    """Every output version made, directly or through others, from ``version_id``."""
    found: list[str] = []
    frontier = {version_id.lower()}
    outputs = [o for t in lineage for o in t.outputs]
    while frontier:
        children = [
            o.version_id for o in outputs if o.source_image_id.lower() in frontier and o.version_id not in found
        ]
        found += children
        frontier = {c.lower() for c in children}
    return found
