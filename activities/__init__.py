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
from activities.guest import Guests
from activities.images import ImageActivities, collect_lineage
from activities.janitor import SweepActivities
from activities.source import SourceActivities
from activities.staging import StagingActivities
from activities.template import validate_template


def activities_for(cloud: Cloud, guests: Guests | None = None) -> list[Callable[..., Any]]:
    """Every activity a build runs, for one worker: the steps' bound to ``cloud``, reaching its VMs through
    ``guests`` (the real OS profiles unless a test gives its own). Listed one by one: adding an activity to a
    class means adding it here."""
    guests = guests or Guests()
    source = SourceActivities(cloud, guests)
    staging = StagingActivities(cloud, guests)
    vm = BuildVmActivities(cloud, guests)
    customize = CustomizeActivities(cloud, guests)
    generalize = GeneralizeActivities(cloud, guests)
    capture = CaptureActivities(cloud, guests)
    distribute = DistributeActivities(cloud, guests)
    images = ImageActivities(cloud, guests)
    sweep = SweepActivities(cloud, guests)
    return [
        validate_template,
        source.resolve_source,
        source.check_source,
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
        images.retire_image_version,
        collect_lineage,
        sweep.delete_tagged,
    ]
