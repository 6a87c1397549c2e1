"""Linux guests as AIB treats them, reached over SSH: the same on every cloud.

AIB generalizes a Linux VM with ``waagent -force -deprovision+user``; kiln runs exactly that where the image
has the Azure agent, and an equivalent of its own where it does not (a Debian base without waagent).
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from activities.clouds.base import PermanentError
from activities.guest.base import POLL_EVERY, Deprovision, FileSource, GuestSession, Transport
from activities.guest.keys import derive_key
from activities.guest.ssh import SshSession, open_session
from workflows.models import BuildVm, GuestScriptRequest, GuestScriptResult, GuestStep
from workflows.plan import guest_steps
from workflows.template import FileCustomizer, ImageTemplate, ShellCustomizer, TemplateIssue

if TYPE_CHECKING:
    from activities.clouds.base import LogSink

WAAGENT = "/usr/sbin/waagent"

# AIB's default Linux deprovision command (the template reference's current form), word for word.
AIB_DEPROVISION = f"""\
WAAGENT={WAAGENT}
waagent -version 1> /dev/null 2>&1
if [ $? -eq 0 ]; then
  WAAGENT=waagent
fi
$WAAGENT -force -deprovision+user && export HISTSIZE=0 && sync
"""

# What waagent -force -deprovision+user does, for images without the agent: whatever must be unique per machine,
# and the build's admin user ($1), leave the disk, so any machine can start from it.
KILN_DEPROVISION = """\
user=$1
if [ -n "$user" ] && id -u "$user" > /dev/null 2>&1; then
  echo "deleting the build user $user"
  # -f: the user is still logged in (this very session); its run files live outside its home and survive.
  userdel -f -r "$user" 2>&1 | grep -v 'mail spool' || true
  rm -f "/etc/sudoers.d/90-$user"
fi
echo "deleting SSH host keys, the machine id, shell history, temporary files and logs"
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /root/.bash_history /home/*/.bash_history
rm -rf /tmp/* /tmp/.[!.]* /var/tmp/* /var/tmp/.[!.]*
find /var/log -type f -delete
export HISTSIZE=0
sync
"""

# Packer's inline_shebang default, which AIB keeps.
INLINE_SHEBANG = "#!/bin/sh -e\n"

# The customizer types AIB runs on a Linux source.
LINUX_STEPS = frozenset({"Shell", "File"})


class SshTransport:
    """Logs in as the VM's admin user with the build's key, accepting only the host key pinned for the VM."""

    @asynccontextmanager
    async def session(self, vm: BuildVm, *, build_id: str, secret: bytes) -> AsyncIterator[SshSession]:
        async with open_session(
            host=vm.host,
            port=vm.port,
            username=vm.admin_user,
            host_key=vm.host_key,
            client_key=derive_key(secret, build_id, "client"),
        ) as session:
            yield session


class LinuxProfile:
    os_type = "Linux"
    poll_every = POLL_EVERY
    deprovision = Deprovision(
        override_path="/tmp/DeprovisioningScript.sh",
        override_command="sh /tmp/DeprovisioningScript.sh",
        provisioner="shell",
    )

    def __init__(self, transport: Transport | None = None) -> None:
        self.transport = transport or SshTransport()

    def template_issues(self, template: ImageTemplate) -> list[TemplateIssue]:
        issues = []
        for path, step in guest_steps(template):
            if step.type not in LINUX_STEPS:
                issues.append(TemplateIssue(path=f"{path}.type", message=f"{step.type} needs a Windows source image"))
            elif isinstance(step, FileCustomizer) and not step.destination.startswith("/tmp/"):
                issues.append(
                    TemplateIssue(
                        path=f"{path}.destination",
                        message=f"'{step.destination}': on Linux the File customizer can only write under /tmp",
                    )
                )
        return issues

    def script_for(self, step: GuestStep, staged: bytes | None) -> str:
        """As Packer's shell provisioner makes it: inline lines become one file under ``#!/bin/sh -e`` (its
        ``inline_shebang``), so the first failing line fails the step; a script file keeps its own ``#!`` line
        (or runs under ``/bin/sh``), with CRLF line endings made LF, as Packer does to every non-binary script."""
        assert isinstance(step, ShellCustomizer)
        if step.inline is not None:
            return INLINE_SHEBANG + "".join(f"{line}\n" for line in step.inline)
        assert staged is not None
        return staged.decode().replace("\r\n", "\n")

    async def prepare(self, guest: GuestSession) -> None:
        return None  # AIB writes nothing into a Linux build VM before its customizers

    async def copy_file(self, guest: GuestSession, destination: str, source: FileSource) -> None:
        await guest.upload(await source.read(), destination)  # SFTP carries any size as fast as the guest could

    async def run_step(self, request: GuestScriptRequest, guest: GuestSession, log: LogSink) -> GuestScriptResult:
        # template_issues refuses these before any VM is made; this is what a request made without it meets.
        raise PermanentError(f"{request.label}: a Linux guest cannot run this step", kind="UnsupportedCustomizer")

    async def default_deprovision(self, guest: GuestSession, vm: BuildVm) -> str:
        if await guest.path_exists(WAAGENT):
            return AIB_DEPROVISION
        return f"set -- {shlex.quote(vm.admin_user)}\n{KILN_DEPROVISION}"
