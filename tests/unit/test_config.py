from __future__ import annotations

import pytest
from pydantic import ValidationError

from bastion.config import Settings, describe_validation_error


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
    assert "BASTION_PORT" in describe_validation_error(info.value)


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
