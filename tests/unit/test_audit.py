from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from bastion.audit import LOGGER_NAME, audit_log
from bastion.exchange import Exchange
from bastion.usage import Usage
from tests.support import AUDIT_FIELDS


def _exchange(**fields: object) -> Exchange:
    exchange = Exchange(request_id="req-1", method="POST", path="/v1/chat/completions", started=5.0)
    for name, value in fields.items():
        setattr(exchange, name, value)
    return exchange


def test_one_json_line_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None
    listener(
        _exchange(
            principal="team-a",
            client_ip="10.0.0.7",
            model="m",
            stream=True,
            status=200,
            usage=Usage(3, 9),
            first_byte=5.0123,
            finished=5.5,
        )
    )
    listener(_exchange(status=400, outcome="rejected", reason="invalid_json", finished=5.001))
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == AUDIT_FIELDS
    assert first["principal"] == "team-a" and first["client_ip"] == "10.0.0.7" and first["stream"] is True
    assert first["latency_ms"] == 500.0 and first["ttft_ms"] == 12.3
    assert (first["prompt_tokens"], first["completion_tokens"]) == (3, 9)
    assert first["time"].endswith("Z")
    assert second["reason"] == "invalid_json" and second["ttft_ms"] is None and second["prompt_tokens"] is None
    assert not logging.getLogger(LOGGER_NAME).propagate


def test_off_means_no_listener() -> None:
    assert audit_log("off") is None
    assert audit_log("OFF") is None


def test_registered_secrets_and_credential_shapes_are_redacted(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    listener = audit_log(str(path), secrets=["internal-upstream-key-42"])
    assert listener is not None
    listener(_exchange(model="internal-upstream-key-42", path="/v1/models/bst-abcdefghijkl0123"))
    text = path.read_text()
    assert "internal-upstream-key-42" not in text
    assert "bst-abcdefghijkl0123" not in text
    json.loads(text)  # still one valid JSON line


def test_unwritable_destination_is_a_start_up_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot open the audit log"):
        audit_log(str(tmp_path / "missing-dir" / "audit.log"))
