"""deploy/ checked offline, with the tools deploy/setup-debian.sh installs: every Kubernetes manifest against the
Kubernetes JSON schemas kubernetes-validate ships, the compose file against the Compose specification's schema
(check-jsonschema's vendored copy), and the Dockerfile with hadolint. Each tool is shown to refuse a broken
copy, so a pass means something."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from activities.clouds.local.azurite import ACCOUNT_KEY, local_accounts

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BIN = Path(sys.executable).parent
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120)


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "kubernetes-validate", "--strict", "--kubernetes-version", "1.33.0", path)


def compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "hadolint", "--no-color", "--config", DEPLOY / ".hadolint.yaml", path)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_each_kubernetes_manifest_matches_the_kubernetes_schemas(manifest: Path) -> None:
    checked = kubernetes_validate(manifest)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "passed" in checked.stdout


def test_the_kubernetes_manifests_cover_a_whole_installation() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert {"Deployment", "HorizontalPodAutoscaler", "Secret", "CronJob", "ServiceAccount", "ConfigMap"} <= kinds


def test_a_broken_manifest_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "worker.yaml"
    broken.write_text((DEPLOY / "kubernetes" / "worker.yaml").read_text().replace("replicas: 2", "replicas: two"))
    checked = kubernetes_validate(broken)
    assert checked.returncode != 0 and "replicas" in checked.stdout + checked.stderr


def test_the_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    checked = compose_check(COMPOSE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    privileged: true", "    privilegd: true"))
    assert compose_check(broken).returncode != 0


def test_the_compose_file_runs_every_service_of_an_installation() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"postgresql", "temporal", "temporal-ui", "codec-server", "kiln-worker", "azurite", "prometheus"} <= set(
        services
    )
    assert services["temporal-ui"]["environment"]["TEMPORAL_CODEC_ENDPOINT"].endswith(":8081")
    # Azurite serves exactly the accounts the local cloud uses, with the key it signs with.
    accounts = services["azurite"]["environment"]["AZURITE_ACCOUNTS"]
    assert accounts == ";".join(f"{account}:{ACCOUNT_KEY}" for account in local_accounts())


def test_the_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    checked = hadolint(DOCKERFILE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    assert "DL3006" in hadolint(careless).stdout  # an untagged base image


def test_the_local_clouds_image_has_every_package_the_local_cloud_runs() -> None:
    """setup-debian.sh names the Debian package of each program the local cloud runs; the image installs them."""
    setup = (DEPLOY / "setup-debian.sh").read_text()
    needed = {
        fields[1]
        for line in re.findall(r'^\s+"(.*)"$', setup, flags=re.MULTILINE)
        if "local cloud" in line and len(fields := line.split()) > 2
    }
    local_stage = DOCKERFILE.read_text().split("AS local", 1)[1]
    assert needed and not [package for package in needed if package not in local_stage.split()]
