"""AIB's rules for a SourceImage trigger, read off the template body as the entity holds it.

From AIB's triggers how-to: the source must be a PlatformImage at ``version: latest`` or a gallery image at
``/versions/latest``; a SharedImage target must not pin its version; and the source and distribution image
definitions must differ (a build would otherwise trigger itself).
"""

from __future__ import annotations

from typing import Any


def _definition(image_id: str) -> str:
    """A gallery image id without its ``/versions/...`` part, case-folded as Azure compares ids."""
    return image_id.lower().split("/versions/")[0]


def source_is_latest(template: dict[str, Any]) -> bool:
    source = template.get("properties", {}).get("source", {})
    if source.get("type") == "PlatformImage":
        return str(source.get("version", "latest")).lower() == "latest"
    if source.get("type") == "SharedImageVersion":
        return str(source.get("imageVersionId", "")).lower().endswith("/versions/latest")
    return False


def trigger_refusal(template: dict[str, Any]) -> str | None:
    """Why AIB would refuse a SourceImage trigger on ``template``, naming the field; None when it accepts one."""
    props = template.get("properties", {})
    source = props.get("source", {})
    if not source_is_latest(template):
        return (
            "properties.source: a SourceImage trigger needs a PlatformImage with version 'latest' or a "
            "SharedImageVersion whose imageVersionId ends in /versions/latest"
        )
    for index, target in enumerate(props.get("distribute", [])):
        if target.get("type") != "SharedImage":
            continue
        gallery_image = str(target.get("galleryImageId", ""))
        if "/versions/" in gallery_image.lower():
            return (
                f"properties.distribute[{index}].galleryImageId: a template with a SourceImage trigger must not "
                f"pin the output version ({gallery_image})"
            )
        if source.get("type") == "SharedImageVersion" and _definition(gallery_image) == _definition(
            str(source.get("imageVersionId", ""))
        ):
            return (
                f"properties.distribute[{index}].galleryImageId: the source and distribution image definitions "
                "must differ for a SourceImage trigger"
            )
    return None
