"""Template validation, run as a local activity so that its verdict is recorded in the build's history.

Validating inside the workflow would judge a build's template again each time its history replays (a worker
restart, the janitor's status query of a closed build), by the replaying worker's rules: a rule added since
would refuse a template the build had accepted, and the replay would fail with non-determinism.
"""

from __future__ import annotations

from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.clouds.registry import cloud_of
from workflows.models import ValidatedTemplate
from workflows.template import TemplateError, check_template


@activity.defn
async def validate_template(template: dict[str, Any]) -> ValidatedTemplate:
    """Validate an AIB template as the build was given it, for the cloud of the build's task queue.

    Returns:
        The template as accepted (``workflows.recorded`` rebuilds the model from it without judging it again),
        and what AIB would accept only with a warning.

    Raises:
        ApplicationError: InvalidTemplate, non-retryable (a bad template stays bad), naming every problem.
    """
    try:
        checked = check_template(template, cloud=cloud_of(activity.info().task_queue))
    except TemplateError as err:
        raise ApplicationError(str(err), type="InvalidTemplate", non_retryable=True) from None
    return ValidatedTemplate(template=checked.template.model_dump(mode="json"), warnings=checked.warnings)
