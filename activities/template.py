"""Template validation, run as a local activity so that its verdict is recorded in the build's history.

Validating inside the workflow would judge a build's template again each time its history replays (a worker
restart, the janitor's status query of a closed build), by the replaying worker's rules: a rule added since
would refuse a template the build had accepted, and the replay would fail with non-determinism.
"""

from __future__ import annotations

from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from workflows.template import TemplateError, parse_template


@activity.defn
async def validate_template(template: dict[str, Any]) -> dict[str, Any]:
    """Validate an AIB template as the build was given it.

    Returns:
        The template as accepted: every field by its JSON name, defaults filled in (``workflows.recorded``
        rebuilds the model from it without judging it again).

    Raises:
        ApplicationError: InvalidTemplate, non-retryable (a bad template stays bad), naming every problem.
    """
    try:
        parsed = parse_template(template)
    except TemplateError as err:
        raise ApplicationError(str(err), type="InvalidTemplate", non_retryable=True) from None
    return parsed.model_dump(mode="json")
