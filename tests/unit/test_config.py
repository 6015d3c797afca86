from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

import pytest
from pydantic import ValidationError

from bastion.cli import main
from bastion.config import ConfigError, LogFormat, Settings, describe, load


def test_env_prefix_and_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_PORT", "9001")
    monkeypatch.setenv("BASTION_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("BASTION_UPSTREAM_API_KEY", "s3cret-value")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.port == 9001
    assert settings.log_level == "debug"
    assert "s3cret-value" not in repr(settings)


def test_invalid_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_PORT", "eighty")
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert describe(Settings, info.value) == [
        "invalid BASTION_PORT: Input should be a valid integer, unable to parse string as an integer; "
        "e.g. BASTION_PORT=8000"
    ]


def test_env_file_is_read(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"  # type: ignore[operator]
    env.write_text("BASTION_MAX_BODY_BYTES=4096\n")
    assert Settings(_env_file=env).max_body_bytes == 4096  # type: ignore[call-arg]


def test_env_example_is_current() -> None:
    from pathlib import Path

    from bastion.config import env_example

    example = (Path(__file__).parents[2] / ".env.example").read_text()
    assert example == env_example(Settings), "regenerate: bastion check-config --env-example > .env.example"


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from Settings: a new or changed setting fails here until regenerated."""
    from pathlib import Path

    from bastion.config import config_reference

    docs = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert docs == config_reference(Settings), "regenerate: bastion check-config --markdown > docs/configuration.md"
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
        assert f"| `BASTION_{name.upper()}` |" in docs


# --- every invalid value is one line naming its variable (issue 17) ----------------------------------------

# A valid gateway apart from the one setting under test: the simulator as its child, a bootstrap key, no audit.
BASELINE = {
    "BASTION_UPSTREAM_COMMAND": "{python} -m bastion simulate --host {host} --port {port}",
    "BASTION_API_KEYS": "bst-baseline_" + "k" * 32,
    "BASTION_AUDIT_LOG": "off",
}
# Wrong values that need knowing the setting; numbers, booleans and choices get one from their type.
WRONG = {
    "host": "my host",
    "upstream_url": "localhost:8001",
    "upstream_api_key": "has a space",
    "upstream_command": "{python} -m bastion simulate --port {prot}",
    "upstream_host": "not_a_host!",
    "upstream_env": "CUDA_VISIBLE_DEVICES",
    "model": "   ",
    "served_model_name": "   ",
    "vllm_extra_args": "--load-format 'dummy",
    "vllm_python": "/nonexistent/python3",
    "passthrough_methods": "GET,BREW",
    "keys_file": "/",
    "api_keys": "too-short",
    "allow_ips": "10.0.0.0/33",
    "deny_ips": "300.1.1.1",
    "trusted_proxies": "the-proxy",
    "jwt_secret": "five5",
    "jwt_public_key_file": "/nonexistent.pem",
    "jwt_jwks": "/nonexistent-jwks.json",
    "jwt_algorithms": "none",
    "jwt_audience": "   ",
    "jwt_issuer": "   ",
    "jwt_models_claim": "   ",
    "jwt_limits_claim": "   ",
    "jwt_allowed_models": '["unclosed',
    "redis_url": "http://x",
    "metrics_token": "has a space",
    "metrics_allow": "10.0.0.0/8x",
    "metrics_models": '["a", 1]',
    "audit_log": "/nonexistent-dir/audit.jsonl",
    "routes": "default,/v1/fiels",
    "budget_timezone": "Mars/Olympus",
    "budget_db": "/",
    "jwt_budgets_claim": "   ",
    "jwt_max_budgets": "year=5",
    "priority_classes": '{"gold": {"order": "first"}}',
    "default_priority_class": "platinum",
    "jwt_priority_class_claim": "   ",
    "jwt_max_priority_class": "platinum",
    "engines": '[{"model": "chat"}]',
    "engines_file": "/nonexistent-engines.json",
    "session_header": "x session",
    "admin_token": "has a space",
    "admin_allow": "10.0.0.0/33",
}


def wrong_value(name: str) -> str:
    if name in WRONG:
        return WRONG[name]
    annotation = Settings.model_fields[name].annotation
    kinds = {a for a in typing.get_args(annotation) if a is not type(None)} or {annotation}
    if kinds <= {int, float}:
        return "many"
    if kinds == {bool}:
        return "maybe"
    if typing.get_origin(annotation) is typing.Literal or (
        isinstance(annotation, type) and issubclass(annotation, Enum)
    ):
        return "nonsense"
    raise AssertionError(f"no wrong value for the new setting {name}: add one to WRONG")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[CLI]:
    """`bastion ...` in this process: a clean environment and directory; (exit status, stdout, stderr)."""
    for name in list(os.environ):
        if name.startswith("BASTION_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        status = main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    yield run
    root.handlers[:], root.level = handlers, level  # check-config installs its own handler


CLI = Callable[..., tuple[int, str, str]]


def test_the_baseline_is_valid(cli: CLI) -> None:
    status, out, err = cli("check-config", env=BASELINE)
    assert status == 0, err
    assert "configuration OK" in err and "upstream_command = {python} -m bastion simulate" in out


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_with_a_wrong_value_is_one_line(cli: CLI, name: str) -> None:
    variable = f"BASTION_{name.upper()}"
    status, out, err = cli("check-config", env={**BASELINE, variable: wrong_value(name)})
    lines = err.splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert variable in lines[0] and "Traceback" not in err and out == ""
    assert lines[0].startswith(f"bastion: invalid {variable}: "), lines[0]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("BASTION_METRICS_ALLOW=10.0.0.0/33", "BASTION_METRICS_ALLOW: item 1"),
        ("BASTION_UPSTREAM_ENV=CUDA_VISIBLE_DEVICES", "BASTION_UPSTREAM_ENV: item 1 is not NAME=value"),
        ("BASTION_PASSTHROUGH_METHODS=[GET", "BASTION_PASSTHROUGH_METHODS: not a valid JSON list"),
    ],
)
def test_a_wrong_value_in_dotenv_is_one_line_too(cli: CLI, tmp_path: Path, line: str, problem: str) -> None:
    (tmp_path / ".env").write_text(line + "\n")
    status, _, err = cli("check-config", env=BASELINE)
    assert status == 2 and err.count("\n") == 1 and problem in err, err


def test_list_and_object_settings_take_what_an_operator_writes(cli: CLI) -> None:
    settings = load(
        Settings,
        {
            "metrics_allow": "10.0.0.0/8, 192.168.1.5",
            "metrics_models": "qwen",
            "passthrough_methods": "get,POST,DELETE",
            "upstream_env": "CUDA_VISIBLE_DEVICES=0,1 HF_HOME='/models/hf cache'",
        },
        env_file=None,
    )
    assert [str(n) for n in settings.metrics_allow] == ["10.0.0.0/8", "192.168.1.5/32"]
    assert settings.metrics_models == ["qwen"]
    assert settings.passthrough_methods == ["GET", "POST", "DELETE"]
    assert settings.upstream_env == {"CUDA_VISIBLE_DEVICES": "0,1", "HF_HOME": "/models/hf cache"}
    as_json = load(Settings, {"upstream_env": '{"CUDA_VISIBLE_DEVICES": 0}', "metrics_allow": '["::1"]'}, env_file=None)
    assert as_json.upstream_env == {"CUDA_VISIBLE_DEVICES": "0"}


def test_choices_ignore_case(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LOG_FORMAT": "JSON",
        "LOG_LEVEL": "DEBUG",
        "REDIS_FAIL_MODE": "Closed",
        "DTYPE": "BFloat16",
    }.items():
        monkeypatch.setenv(f"BASTION_{name}", value)
    settings = load(Settings, env_file=None)
    assert (settings.log_format, settings.log_level, settings.redis_fail_mode, settings.dtype) == (
        LogFormat.JSON,
        "debug",
        "closed",
        "bfloat16",
    )


def test_an_empty_value_means_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("BASTION_MAX_MODEL_LEN=\nBASTION_UPSTREAM_URL=\nBASTION_JWT_MAX_RPM=\n")
    monkeypatch.setenv("BASTION_KEYS_FILE", "")
    settings = load(Settings, {"served_model_name": ""}, env_file=env)
    assert settings.max_model_len is None and settings.upstream_url is None and settings.jwt_max_rpm is None
    assert settings.keys_file is None and settings.served_model_name is None


def test_a_short_hmac_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_JWT_SECRET", "s" * 31)
    with pytest.raises(ConfigError, match="invalid BASTION_JWT_SECRET: an HMAC secret needs at least 32 bytes"):
        load(Settings, env_file=None)
    monkeypatch.setenv("BASTION_JWT_SECRET", "s" * 32)
    assert load(Settings, env_file=None).jwt_secret is not None


def test_background_responses_need_the_cap_enforced(cli: CLI) -> None:
    """A background response is charged its reservation: allowed without the cap enforced, the engine could
    generate the rest of its context window on a reservation of BASTION_DEFAULT_MAX_TOKENS."""
    status, _, err = cli("check-config", env={**BASELINE, "BASTION_RESPONSES_BACKGROUND": "true"})
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bastion: invalid BASTION_RESPONSES_BACKGROUND: ")
    assert "BASTION_ENFORCE_MAX_TOKENS=true" in err
    enforced = {**BASELINE, "BASTION_RESPONSES_BACKGROUND": "true", "BASTION_ENFORCE_MAX_TOKENS": "true"}
    assert cli("check-config", env=enforced)[0] == 0


def test_unknown_names_are_warned_about_with_a_suggestion(cli: CLI, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BASTION_KEYS_FLIE=/tmp/keys.json\n")
    status, _, err = cli("check-config", env={**BASELINE, "BASTION_PROT": "8001", "BASTION_SIMULATE_TFTT": "1"})
    assert status == 0, err
    assert "BASTION_PROT (in the environment) is not a setting and is ignored; did you mean BASTION_PORT?" in err
    assert "BASTION_KEYS_FLIE (in .env) is not a setting and is ignored; did you mean BASTION_KEYS_FILE?" in err
    assert "did you mean BASTION_SIMULATE_TTFT?" in err


@pytest.mark.parametrize(
    "example", [".env.example", "deploy/systemd/bastion.env.example", "deploy/compose/bastion.env.example"]
)
def test_env_examples_with_every_line_uncommented_pass_check_config(tmp_path: Path, example: str) -> None:
    """Every `# BASTION_X=...` line of an example, uncommented, is accepted (empty = unset)."""
    text = (Path(__file__).parents[2] / example).read_text()
    lines = [re.sub(r"^# ?", "", line) for line in text.splitlines() if re.match(r"# ?BASTION_\w+=", line)]
    lines += [line for line in text.splitlines() if line.startswith("BASTION_")]
    if example == ".env.example":
        assert len(lines) == len(Settings.model_fields)
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    check = [sys.executable, "-m", "bastion", "check-config"]
    result = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:  # the examples supervise vLLM: serve refuses the same way where it cannot run
        assert result.returncode == 2 and "bastion: cannot start the model server" in result.stderr, result.stderr
        assert "invalid" not in result.stderr and "Traceback" not in result.stderr
        env["BASTION_UPSTREAM_URL"] = "http://127.0.0.1:8001"  # the same file, in external mode
        result = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stderr and "bastion: warning" not in result.stderr
