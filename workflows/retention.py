"""Which output versions retention keeps: pure rules over the lineage of every template.

A template keeps its newest ``keep`` gallery versions; an older one stays too while another template still uses
it as a source (its current revision pins it, or its last build was made from it). Versions already deleted are
not counted, and neither are ones revoked: they are out of service already.
"""

from __future__ import annotations

from workflows.golden_models import OutputLineage, RetentionRequest, TemplateLineage


def in_use_by_others(lineage: list[TemplateLineage], template: str) -> set[str]:
    """The versions other templates build from, by lower-cased id (Azure compares ids without case)."""
    used = set()
    for other in lineage:
        if other.name != template:
            used |= {source.lower() for source in (other.pinned_source, other.last_source) if source}
    return used


def retention_plan(lineage: list[TemplateLineage], request: RetentionRequest) -> tuple[list[str], list[str], list[str]]:
    """(kept, kept because in use, to retire): the template's gallery versions, newest first in each list."""
    own = next((t for t in lineage if t.name == request.template), None)
    if own is None:
        return [], [], []
    live = [
        o for o in own.outputs if o.type == "SharedImage" and (o.retired is None or o.retired.action == "end-of-life")
    ]
    newest_first: list[OutputLineage] = sorted(live, key=lambda o: o.run, reverse=True)
    kept = [o.version_id for o in newest_first[: request.keep]]
    used = in_use_by_others(lineage, request.template)
    older = [o.version_id for o in newest_first[request.keep :]]
    in_use = [v for v in older if v.lower() in used]
    if request.action == "end-of-life":
        older = [o.version_id for o in newest_first[request.keep :] if o.retired is None]
    return kept, in_use, [v for v in older if v not in in_use]


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
