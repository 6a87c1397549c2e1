"""All of kiln's I/O: one module per build step, each a thin activity over a ``Cloud``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from activities.build_vm import BuildVmActivities
from activities.capture import CaptureActivities
from activities.clouds.base import Cloud
from activities.customize import CustomizeActivities
from activities.distribute import DistributeActivities
from activities.generalize import GeneralizeActivities
from activities.source import SourceActivities
from activities.staging import StagingActivities
from activities.template import validate_template


def activities_for(cloud: Cloud) -> list[Callable[..., Any]]:
    """Every activity a build runs, for one worker, the steps' bound to ``cloud``. Listed one by one: adding an
    activity to a class means adding it here."""
    source = SourceActivities(cloud)
    staging = StagingActivities(cloud)
    vm = BuildVmActivities(cloud)
    customize = CustomizeActivities(cloud)
    generalize = GeneralizeActivities(cloud)
    capture = CaptureActivities(cloud)
    distribute = DistributeActivities(cloud)
    return [
        validate_template,
        source.resolve_source,
        staging.create_staging,
        staging.stage_artifacts,
        staging.delete_staging,
        vm.create_vm,
        vm.delete_vm,
        customize.run_customizer,
        generalize.generalize,
        capture.capture_image,
        capture.delete_image,
        distribute.distribute,
        distribute.delete_output,
    ]
