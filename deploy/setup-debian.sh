#!/usr/bin/env bash
# Everything kiln needs on a Debian machine, run as root: system packages, the virtual environment, Azurite.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    python3-venv          # the virtual environment
    mmdebstrap debian-archive-keyring   # local cloud: base images from the Debian package registry
    qemu-utils            # local cloud: fixed VHDs (qemu-img)
    e2fsprogs             # local cloud: ext4 from a folder (mke2fs -d), debugfs
    openssh-client        # local cloud: ssh-keygen for host keys
    iproute2              # local cloud: a loopback address per build VM
    util-linux mount      # local cloud: unshare, setsid, nsenter, mount
    nodejs npm            # Azurite, the Azure Storage emulator
)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "==> installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating .venv"
    python3 -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.kiln-pyproject.sha256
if ! sha256sum --status -c "$stamp" 2>/dev/null; then
    echo "==> installing kiln and its Python dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    sha256sum pyproject.toml > "$stamp"
fi

if [[ ! -x node_modules/.bin/azurite-blob ]]; then
    echo "==> installing Azurite into node_modules"
    npm install --no-audit --no-fund --loglevel=error --no-save azurite@3
fi
