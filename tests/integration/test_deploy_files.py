"""The shipped deploy/ artefacts against the tools that judge them.

systemd-analyze (verify, offline security score), hadolint and a Dockerfile parse,
the compose-spec schema (and `docker compose config` where the plugin exists), the
Kubernetes OpenAPI schemas (kubernetes-validate). Each check that needs a tool this
machine lacks is skipped with the reason; the Python ones come from the `test` extra.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
