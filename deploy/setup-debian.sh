#!/usr/bin/env bash
# Everything kiln needs on a Debian machine, run as root: system packages, the virtual environment, Azurite.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# need COMMAND PACKAGE: install PACKAGE when COMMAND is not there (a Node.js from elsewhere is fine too).
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need make make                 # `make demo`, `make test` and the other targets
need mmdebstrap mmdebstrap     # local cloud: base images from the Debian package registry
need qemu-img qemu-utils       # local cloud: fixed VHDs
need mke2fs e2fsprogs          # local cloud: ext4 from a folder (mke2fs -d); debugfs reads images
need ip iproute2               # local cloud: a loopback address per build VM
need unshare util-linux        # local cloud: namespaces (unshare, nsenter, setsid)
need mount mount
need npm npm                   # Azurite, the Azure Storage emulator (Debian's npm brings nodejs)
[[ -e /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
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
    # pip's notes about this machine's extra package folders are noise here; real errors still show.
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2> >(grep -v "^WARNING: Location" >&2)
    sha256sum pyproject.toml > "$stamp"
fi

if [[ ! -x node_modules/.bin/azurite-blob ]]; then
    echo "==> installing Azurite into node_modules"
    npm install --no-audit --no-fund --loglevel=error --no-save azurite@3
fi
