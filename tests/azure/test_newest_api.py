"""AIB's newest API (2025-10-01), and the fields before it only some versions have, built on the Azure cloud:
the ImageBuild workflow through a real worker, the ARM emulator (the real SDK clients) and real SSH guests."""

from __future__ import annotations

import hashlib

from tests.azure.environment import AzureHarness, prepare, temporary
from workflows.models import RunState

CHECK = b"#!/bin/sh\ntest -s /etc/motd && echo validated-by-file\n"


async def test_a_file_validator_puts_its_file_on_the_validation_vm(harness: AzureHarness) -> None:
    await prepare(harness.arm.base_url)
    template = harness.corpus("q0_helloImageTemplateLinux.json")
    template["apiVersion"] = "2022-07-01"  # File validators are there from this version on
    check = harness.artifacts / "check.sh"
    check.write_bytes(CHECK)
    template["properties"]["customize"] = [{"type": "Shell", "inline": ["echo golden | sudo tee /etc/motd"]}]
    template["properties"]["validate"] = {
        "inVMValidations": [
            {
                "type": "File",
                "name": "check script",
                "sourceUri": check.as_uri(),
                "destination": "/tmp/check.sh",
                "sha256Checksum": hashlib.sha256(CHECK).hexdigest(),
            },
            {"type": "Shell", "name": "run it", "inline": ["sh /tmp/check.sh"]},
        ]
    }
    status = await harness.finish(await harness.start(template, "file-validator"))
    assert status.run_state == RunState.SUCCEEDED, status.message
    log = await harness.log(status, "validation.log")
    assert "validated-by-file" in log
    assert "validate 1/2: check script" in log
    assert temporary(harness.arm) == []
