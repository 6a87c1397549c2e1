"""A root shell in a Linux VM through Run Command (the VM agent), with no SSH login: how a worker that takes
over a deprovision reads how it went once the admin user and the host keys are gone.

Run Command takes a script and no input, and hands back its output as text, cut at about 4 KiB: the command's
input travels base64-encoded in the script, its output and errors come back base64-encoded, and output is read
in small chunks.
"""

from __future__ import annotations

import base64
import binascii
import shlex

from activities.clouds.azure.clients import ArmClients
from activities.clouds.azure.errors import arm_call
from activities.clouds.azure.vm import lro, run_command_stdout
from activities.guest.ssh import Completed, ShellSession

# Output bytes one poll reads: their base64 and the errors' stay under what Run Command hands back.
CHUNK_BYTES = 2048
_END = "kiln-run-command-end"

_WRAPPER = """work=$(mktemp -d)
printf %s {stdin} | base64 -d > "$work/in"
sh -c {command} < "$work/in" > "$work/out" 2> "$work/err"
code=$?
echo "{end} $code $(base64 -w0 < "$work/out") $(head -c 1024 "$work/err" | base64 -w0)"
rm -rf "$work"
"""


class RunCommandSession(ShellSession):
    """``ShellSession`` as root through ``RunShellScript``; every command is one Run Command of its own."""

    poll_chunk_bytes = CHUNK_BYTES

    def __init__(self, arm: ArmClients, group: str, vm_name: str) -> None:
        super().__init__("root")
        self._arm = arm
        self._group = group
        self._vm_name = vm_name

    async def command(self, command: str, *, stdin: bytes | None) -> Completed:
        script = _WRAPPER.format(
            stdin=shlex.quote(base64.b64encode(stdin or b"").decode()), command=shlex.quote(command), end=_END
        )
        vm = self._vm_name
        async with arm_call(f"VM {vm}", needs="Microsoft.Compute/virtualMachines/runCommand/action"):
            result = await lro(
                self._arm.compute.virtual_machines.begin_run_command(
                    self._group, vm, {"commandId": "RunShellScript", "script": script.splitlines()}
                )
            )
        for line in run_command_stdout(result).splitlines():
            fields = line.split(" ")
            if len(fields) == 4 and fields[0] == _END:
                try:
                    return Completed(int(fields[1]), base64.b64decode(fields[2]), base64.b64decode(fields[3]))
                except (ValueError, binascii.Error):
                    break
        # The agent did not run it to the end (busy, restarting): the caller's retry asks again.
        raise RuntimeError(f"Run Command on VM {vm} returned no result")
