"""A worker that takes over a deprovision another worker started cannot log in (the admin user is gone): it
reads the run's end through Run Command instead, against the ARM emulator's real SSH guests."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from temporalio.testing import ActivityEnvironment

from activities.clouds.azure import AzureCloud
from activities.clouds.base import PermanentError
from activities.generalize import GeneralizeActivities
from activities.scripts import run_id_of
from tests.arm_emulator import ArmEmulator
from tests.azure.environment import Guests, kiln_resources
from tests.azure.test_azure_cloud import linux_build_vm
from tests.fixtures import GUESTS, connect, deprovision_script
from workflows.models import GuestScriptRequest


async def test_a_deprovision_whose_worker_died_is_finished_through_run_command(
    cloud: AzureCloud, arm: ArmEmulator, guests: Guests
) -> None:
    build, staging, vm = await linux_build_vm(cloud, arm, guests)
    request = GuestScriptRequest(build=build, staging=staging, vm=vm, index=3, label="deprovision")
    try:
        # The first attempt: it starts the deprovision and dies; the run goes on without it.
        async with connect(cloud, build, vm) as guest:
            await guest.start_script(run_id_of(request), await deprovision_script(guest, vm), as_root=True)
            while (await guest.poll_script(run_id_of(request), 0)).exit_code is None:
                await asyncio.sleep(0.1)
        with pytest.raises(PermanentError, match="refused the login"):
            async with connect(cloud, build, vm):
                pass

        retry = ActivityEnvironment()
        retry.info = dataclasses.replace(ActivityEnvironment.default_info(), attempt=2)
        result = await retry.run(GeneralizeActivities(cloud, GUESTS).generalize, request)

        assert result.exit_code == 0
        log = (await (await cloud.open_log(build, staging, "customization.log")).read()).decode()
        assert "account and entire home directory will be deleted" in log, log
        assert "deprovision: exit code 0" in log, log
    finally:
        await cloud.delete_vm(build, vm.name)
        await cloud.delete_staging(build)
    assert kiln_resources(arm) == []
