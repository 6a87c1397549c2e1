"""How a local base image is made: a Debian root filesystem like the one inside Debian's own Azure images.

mmdebstrap installs Debian's cloud-image package set from the Debian registry: systemd as init, the cloud
kernel with its initramfs, GRUB for BIOS and UEFI side by side (``grub-cloud-amd64`` brings both, the signed
shim and GRUB too), cloud-init, the Azure agent, sshd, sudo and curl. Nothing unique to a machine stays in it.
The boot loader is not installed here: capture writes it for the disk it makes (``disks.py``), so a package
install inside a build VM never tries to touch a disk.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from activities.clouds.local.host import end_what_runs_in

# Bumped whenever what a base holds changes: a kept base of an older recipe is not used for ``latest``.
RECIPE = 4
DEBIAN_MIRROR = os.environ.get("KILN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get("KILN_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")

# Debian's cloud-image classes CLOUD, SYSTEM_BOOT, AZURE and GRUB_CLOUD_AMD64, as their config space lists them.
BASE_PACKAGES = [
    *("systemd", "systemd-sysv", "dbus", "libpam-systemd", "udev", "kmod", "e2fsprogs", "procps"),
    *("linux-image-cloud-amd64", "initramfs-tools", "zstd"),
    *("cloud-init", "cloud-guest-utils", "cloud-initramfs-growroot"),
    *("openssh-server", "sudo", "curl", "ca-certificates", "iproute2", "chrony"),
    *("netplan.io", "systemd-resolved", "libnss-myhostname"),
    *("waagent", "hyperv-daemons"),
    "grub-cloud-amd64",
]
# A cloud image carries no documentation or translations; dpkg keeps these rules, so later installs skip them too.
_DPKG_EXCLUDES = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
]
# What Azure requires of a Linux image's kernel command line: the serial console, from the first message.
AZURE_KERNEL_ARGS = "console=tty1 console=ttyS0,115200n8 earlyprintk=ttyS0"
_CLOUD_CFG = "$1/etc/cloud/cloud.cfg.d"
_HOOKS = [
    # cloud-init takes a local NoCloud seed first (build and validation VMs here), else Azure's own datasource.
    f'printf "datasource_list: [ NoCloud, Azure ]\\n" > "{_CLOUD_CFG}/90_kiln_datasource.cfg"',
    # No locale data is installed: C.UTF-8 (built into glibc), where cloud-init would set en_US.UTF-8.
    f'printf "locale: C.UTF-8\\n" > "{_CLOUD_CFG}/02_kiln_locale.cfg"; echo LANG=C.UTF-8 > "$1/etc/default/locale"',
    # The mount point of a build VM's seed, bound in read-only so that no seed file lands in its image.
    'mkdir -p "$1/var/lib/cloud/seed/nocloud"',
    # GRUB as the image would configure itself, should it ever run update-grub on Azure.
    f'mkdir -p "$1/etc/default/grub.d" && printf \'GRUB_CMDLINE_LINUX_DEFAULT="{AZURE_KERNEL_ARGS}"\\n'
    'GRUB_TIMEOUT=0\\n\' > "$1/etc/default/grub.d/50-kiln-azure.cfg"',
    # systemd-resolved owns resolv.conf. waagent's deprovision deletes it; the tmpfiles rule brings it back at
    # the next boot, so a generalized image still resolves names.
    'ln -sf /run/systemd/resolve/stub-resolv.conf "$1/etc/resolv.conf"',
    "printf 'L /etc/resolv.conf - - - - /run/systemd/resolve/stub-resolv.conf\\n' "
    '> "$1/usr/lib/tmpfiles.d/kiln-resolv.conf"',
    # Nothing that must be unique per machine: host keys (cloud-init makes them), machine-id, hostname.
    'rm -f "$1"/etc/ssh/ssh_host_*; : > "$1/etc/machine-id"; rm -f "$1/var/lib/dbus/machine-id"; '
    'echo localhost > "$1/etc/hostname"',
    # The root's fstab entry is written at capture, by the UUID of the disk it makes.
    ': > "$1/etc/fstab"',
]


async def make_debian_base(suite: str, rootfs: Path, log: Path) -> None:
    """Make the root filesystem of a Debian ``suite`` (bookworm, trixie) cloud image at ``rootfs``.

    Raises:
        RuntimeError: mmdebstrap failed (the last lines of its log say why); a retry may pass.
    """
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        f"--include={','.join(BASE_PACKAGES)}",
        # The package lists stay, as in a marketplace image: a customizer's `apt-get install` works at once.
        "--skip=cleanup/apt/lists",
        *(f"--dpkgopt={option}" for option in _DPKG_EXCLUDES),
        *(f"--customize-hook={hook}" for hook in _HOOKS),
        suite,
        str(rootfs),
        f"deb {DEBIAN_MIRROR} {suite} main",
        f"deb {DEBIAN_MIRROR} {suite}-updates main",
        f"deb {DEBIAN_SECURITY_MIRROR} {suite}-security main",
    ]
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # one group with the package tools it runs, to be ended together
        )  # fmt: skip
        try:
            returncode = await process.wait()
        except asyncio.CancelledError:  # the build was cancelled, or its step handed over: mmdebstrap stops too
            await asyncio.to_thread(end_what_runs_in, rootfs)
            raise
    if returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"mmdebstrap could not make a Debian {suite} base ({returncode}):\n" + "\n".join(tail))
