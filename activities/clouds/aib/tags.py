"""The tags on everything kiln makes, so its leftovers can be found without Temporal, on either cloud.

AIB tags what it makes for a build ``createdBy`` and with the template's name and resource group, on top of the
template's ``managedResourceTags``. kiln adds one build-id key, ``kilnBuildId``, and a role that says what
happens to the resource when the build ends: temporary ones are the saga's (and the janitor's) to delete; outputs
and logs are the user's and outlive the build. Blobs carry the build id in their metadata, whose names must be
C# identifiers, so there the keys are lower case.
"""

from __future__ import annotations

from workflows.models import BuildContext

TAG_BUILD_ID = "kilnBuildId"
TAG_CREATED_BY = "createdBy"
CREATED_BY = "kiln"
TAG_TEMPLATE_NAME = "imageTemplateName"
TAG_TEMPLATE_RESOURCE_GROUP = "imageTemplateResourceGroupName"
TAG_ROLE = "kilnRole"
# Set on a gallery image version `kiln images revoke` revoked: why, and when. No build starts from it.
TAG_REVOKED = "kilnRevoked"
ROLE_TEMPORARY = "temporary"
ROLE_OUTPUT = "output"
ROLE_LOG = "log"

BUILD_ID_METADATA = "kilnbuildid"
CREATED_BY_METADATA = "createdby"


def kiln_tags(build_id: str, *, role: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """kiln's own tags on a resource of a build, over ``extra`` (the user's), which cannot forge them."""
    return {**(extra or {}), TAG_BUILD_ID: build_id, TAG_CREATED_BY: CREATED_BY, TAG_ROLE: role}


def build_tags(build: BuildContext, *, role: str) -> dict[str, str]:
    """AIB's tags on what it makes for a build (managedResourceTags, then the template's name and group), and
    kiln's own on top."""
    aib = {
        TAG_TEMPLATE_NAME: build.template_name,
        TAG_TEMPLATE_RESOURCE_GROUP: build.destination_resource_group,
    }
    return kiln_tags(build.build_id, role=role, extra={**build.managed_resource_tags, **aib})


def blob_metadata(build_id: str) -> dict[str, str]:
    """The metadata of a blob or container kiln writes for a build."""
    return {BUILD_ID_METADATA: build_id, CREATED_BY_METADATA: CREATED_BY}


def written_by(metadata: dict[str, str] | None, build_id: str) -> bool:
    """Whether a blob with this metadata was written by the build: only those are its to resume or delete."""
    return (metadata or {}).get(BUILD_ID_METADATA) == build_id
