from __future__ import annotations

import asyncio
import calendar
import errno
import io
import json
import logging
import time
import tracemalloc
from pathlib import Path

import pytest

from bastion import audit as audit_module
from bastion.accounting import charge
from bastion.app import create_app
from bastion.audit import AuditLog, AuditWriter, audit_log
from bastion.auth.identity import Principal
from bastion.config import Settings
from bastion.context import Exchange, Outcome
from bastion.logs import RedactingFilter
from bastion.usage import Usage
from tests.support import AUDIT_FIELDS


def _exchange(**fields: object) -> Exchange:
    exchange = Exchange(request_id="req-1", method="POST", path="/v1/chat/completions", started=5.0)
    for name, value in fields.items():
        if name == "outcome":
            value = Outcome(value)
        elif name == "principal" and isinstance(value, str):
            value = Principal("id", value, "key")
        setattr(exchange, name, value)
    return exchange


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class CountingFile(io.FileIO):
    """A real file that counts its write calls (each one is a write system call)."""

    writes = 0

    def write(self, data: object) -> int:
        self.writes += 1
        return super().write(data)  # type: ignore[arg-type]


def test_one_json_line_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None
    listener(
        _exchange(
            principal=Principal("id-team-a", "team-a", "key"),
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
    first, second = _lines(path)
    assert set(first) == AUDIT_FIELDS
    assert first["principal"] == "team-a" and first["client_ip"] == "10.0.0.7" and first["stream"] is True
    assert first["latency_ms"] == 500.0 and first["ttft_ms"] == 12.3
    assert (first["prompt_tokens"], first["completion_tokens"], first["charged_tokens"]) == (3, 9, 12)
    assert str(first["time"]).endswith("Z")
    assert second["reason"] == "invalid_json" and second["ttft_ms"] is None and second["prompt_tokens"] is None
    assert second["charged_tokens"] == 0


def _as_json_dumps_would(exchange: Exchange, time_field: str) -> str:
    """The line as the earlier implementation built it: a dict through json.dumps."""
    usage, latency, ttft = exchange.usage, exchange.latency, exchange.ttft
    entry = {
        "time": time_field,
        "request_id": exchange.request_id,
        "principal": exchange.principal_name,
        "client_ip": exchange.client_ip,
        "method": exchange.method,
        "path": exchange.path[:256],
        "model": exchange.model[:256],
        "engine": exchange.engine,
        "stream": exchange.stream,
        "status": exchange.status,
        "outcome": exchange.outcome,
        "reason": exchange.reason,
        "latency_ms": None if latency is None else round(latency * 1000, 3),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
        "prompt_tokens": None if usage is None else usage.prompt_tokens,
        "completion_tokens": None if usage is None else usage.completion_tokens,
        "charged_tokens": charge(exchange)[0],
    }
    return json.dumps(entry, separators=(",", ":")) + "\n"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"principal": 'quote " back \\ slash', "model": "\x00\x1f\x7f tab\t nl\n", "stream": True, "status": 200},
        {"model": "modèle-日本-😀", "path": "/v1/" + "x" * 300, "client_ip": "::1", "reason": "midstream"},
        {"usage": Usage(0, 123456789), "first_byte": 5.0000004, "finished": 1e9, "status": 599},
        {"first_byte": 5.1 + 1e-12, "finished": 5.123456789, "outcome": "client_disconnect"},
    ],
)
def test_line_is_byte_for_byte_what_json_dumps_made(tmp_path: Path, fields: dict[str, object]) -> None:
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None
    exchange = _exchange(**fields)
    listener(exchange)
    line = path.read_text()
    time_field = json.loads(line)["time"]
    assert line == _as_json_dumps_would(exchange, time_field)


def test_one_listener_writes_each_line_with_its_own_fields(tmp_path: Path) -> None:
    """The encoded middle fields are remembered by their values: a line never carries another request's."""
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None
    variants: list[dict[str, object]] = [
        {},
        {"principal": "team-a"},
        {"principal": "team-b", "client_ip": "10.0.0.2"},
        {"principal": "team-b", "client_ip": "10.0.0.2", "method": "GET"},
        {"path": "/v1/completions", "model": "m"},
        {"model": "m", "engine": "m/1"},
        {"engine": "m/1"},
        {},
    ]
    exchanges = [_exchange(**fields) for fields in variants * 2]
    for exchange in exchanges:
        listener(exchange)
    for line, exchange in zip(path.read_text().splitlines(keepends=True), exchanges, strict=True):
        assert line == _as_json_dumps_would(exchange, json.loads(line)["time"])


def test_time_is_utc_with_milliseconds(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None
    before = time.time()
    listener(_exchange())
    after = time.time()
    [line] = _lines(path)
    stamp = str(line["time"])
    seconds = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    assert int(before) <= seconds + int(stamp[20:23]) / 1000 <= after + 0.001
    assert len(stamp) == 24 and stamp[19] == "." and stamp.endswith("Z")


def test_off_means_no_listener() -> None:
    assert audit_log("off") is None
    assert audit_log("OFF") is None


def test_registered_secrets_and_credential_shapes_are_redacted(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    listener = audit_log(str(path), secrets=["internal-upstream-key-42"])
    assert listener is not None
    for _ in range(2):  # the second time from the memo of redacted fields
        listener(
            _exchange(
                model="internal-upstream-key-42",
                path="/v1/models/bst-abcdefghijkl0123",
                request_id="bst-abcdefghijkl4567",
            )
        )
    text = path.read_text()
    for secret in ("internal-upstream-key-42", "bst-abcdefghijkl0123", "bst-abcdefghijkl4567"):
        assert secret not in text
    assert len(_lines(path)) == 2  # still valid JSON lines


def test_a_secret_added_later_is_redacted_even_in_a_field_already_memoised(tmp_path: Path) -> None:
    """An engine restarted after the log was opened has a new key: `add_secret` teaches it, and a field
    redacted (memoised) before it was known is not written from the memo in clear."""
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None
    listener(_exchange(model="engine-key-minted-later-0123"))
    listener.add_secret("engine-key-minted-later-0123")
    listener(_exchange(model="engine-key-minted-later-0123"))
    assert [line["model"] for line in _lines(path)] == ["engine-key-minted-later-0123", "[redacted]"]


def test_the_memo_holds_no_more_of_a_long_path_than_the_line_writes(tmp_path: Path) -> None:
    """Any client, before authentication, chooses the path (up to the 64 KiB head): the memo of encoded fields
    must keep what the line keeps (256 characters), not each distinct whole path (1,024 of them: 64 MiB)."""
    listener = audit_log(str(tmp_path / "audit.log"))
    assert listener is not None
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(600):
            listener(_exchange(path=f"/v1/{i:06d}" + "a" * 60_000, status=401))
            listener.writer.flush()
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert held < 4 * 1024 * 1024, f"{held} bytes held after 600 long paths"
    assert len(_lines(tmp_path / "audit.log")[0]["path"]) == 256  # type: ignore[arg-type]


def test_unwritable_destination_is_a_start_up_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot open the audit log"):
        audit_log(str(tmp_path / "missing-dir" / "audit.log"))


def test_stdout_destination(capfd: pytest.CaptureFixture[str]) -> None:
    listener = audit_log("stdout")
    assert listener is not None
    listener(_exchange(status=204))
    [line] = capfd.readouterr().out.splitlines()
    assert json.loads(line)["status"] == 204


# --- the writer ------------------------------------------------------------------------------


async def test_lines_of_one_loop_iteration_are_one_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    stream = CountingFile(path, "ab")
    listener = AuditLog(AuditWriter(stream, str(path)), RedactingFilter())
    for i in range(10):
        listener(_exchange(status=200 + i))
    assert path.read_bytes() == b"" and stream.writes == 0, "nothing written before the loop turns"
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert [line["status"] for line in _lines(path)] == list(range(200, 210))
    listener(_exchange())
    listener(_exchange())
    await asyncio.sleep(0)
    assert stream.writes == 2 and len(_lines(path)) == 12
    listener.writer.close()


async def test_a_large_batch_is_written_before_the_loop_turns(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    stream = CountingFile(path, "ab")
    writer = AuditWriter(stream, str(path))
    line = "x" * 1000 + "\n"
    for _ in range(100):  # 100 kB: past the 64 KiB bound
        writer.write(line)
    assert stream.writes == 1 and path.stat().st_size >= 64 * 1024
    await asyncio.sleep(0)
    assert stream.writes == 2 and path.stat().st_size == 100 * len(line)
    writer.close()


async def test_close_writes_what_is_buffered_and_later_lines_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None
    listener(_exchange(status=201))
    listener(_exchange(status=202))
    listener.writer.close()  # no loop turn in between
    assert [line["status"] for line in _lines(path)] == [201, 202]
    listener(_exchange(status=203))  # e.g. a request that ends after the lifespan: reopens the file
    assert [line["status"] for line in _lines(path)] == [201, 202, 203]
    listener.writer.close()


def test_logrotate_moving_the_file_is_noticed_within_a_second(tmp_path: Path) -> None:
    path, rotated = tmp_path / "audit.log", tmp_path / "audit.log.1"
    listener = audit_log(str(path))
    assert listener is not None
    listener(_exchange(status=201))
    path.rename(rotated)
    listener(_exchange(status=202))  # within the second: the path is not checked yet
    time.sleep(1.1)
    listener(_exchange(status=203))
    listener(_exchange(status=204))
    assert [line["status"] for line in _lines(rotated)] == [201, 202]
    assert [line["status"] for line in _lines(path)] == [203, 204]
    listener.writer.close()


def test_a_deleted_file_is_created_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_module, "_CHECK_SECONDS", 0.0)
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None
    listener(_exchange(status=201))
    path.unlink()
    listener(_exchange(status=202))
    assert [line["status"] for line in _lines(path)] == [202]
    listener.writer.close()


class FailingStream(io.BytesIO):
    failing = True

    def write(self, data: object) -> int:
        if self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)  # type: ignore[arg-type]


async def test_a_failed_write_drops_lines_logs_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    stream = FailingStream()
    listener = AuditLog(AuditWriter(stream), RedactingFilter())
    with caplog.at_level(logging.WARNING, logger="bastion.audit"):
        listener(_exchange())
        await asyncio.sleep(0)
        listener(_exchange())
        listener(_exchange())
        await asyncio.sleep(0)
        listener.writer.close()
        assert listener.writer.dropped == 3
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()
        stream.failing = False
        listener(_exchange(status=299))
    assert json.loads(stream.getvalue())["status"] == 299
    assert "3 lines dropped" in caplog.records[-1].getMessage()


async def test_the_lifespan_writes_buffered_lines_at_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    settings = Settings(_env_file=None, upstream_url="http://127.0.0.1:9", audit_log=str(path))  # type: ignore[call-arg, arg-type]
    app = create_app(settings)
    [listener] = [listener for listener in app._listeners if isinstance(listener, AuditLog)]
    async with app.api.router.lifespan_context(app.api):
        listener(_exchange(status=200))
        assert path.read_bytes() == b""  # buffered until the loop turns
    assert [line["status"] for line in _lines(path)] == [200]


def test_a_loop_that_ended_before_its_flush_does_not_hold_later_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    listener = audit_log(str(path))
    assert listener is not None

    first = asyncio.new_event_loop()

    def line_then_stop() -> None:
        listener(_exchange(status=201))  # schedules a flush that this loop never runs
        first.stop()

    async def one_line() -> None:
        listener(_exchange(status=202))

    first.call_soon(line_then_stop)
    first.run_forever()
    first.close()
    assert path.read_bytes() == b""
    asyncio.run(one_line())
    assert [line["status"] for line in _lines(path)] == [201, 202]
    listener.writer.close()
