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
from activities.source import SourceActivities
from activities.staging import StagingActivities

STEP_ACTIVITIES = (
    SourceActivities,
    StagingActivities,
    BuildVmActivities,
    CustomizeActivities,
    GeneralizeActivities,
    CaptureActivities,
    DistributeActivities,
)


def activities_for(cloud: Cloud, guests: Guests | None = None) -> list[Callable[..., Any]]:
    """Every build activity, bound to ``cloud`` and reaching its VMs through ``guests`` (the real OS profiles
    unless a test gives its own), for one worker."""
    bound = []
    guests = guests or Guests()
    for cls in STEP_ACTIVITIES:
        instance = cls(cloud, guests)
        bound += [
            getattr(instance, name)
            for name, member in vars(cls).items()
            if callable(member) and hasattr(member, "__temporal_activity_definition")
        ]
    return bound
