"""Budgets as written (CLI, key file, JWT claim), defaults, the JWT ceiling, and calendar periods."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jose import jwt as jose_jwt

from bastion.app import jwt_config
from bastion.auth.errors import AuthFailure
from bastion.auth.jwt import JWTVerifier, mint
from bastion.auth.keys import KeyStoreError, parse_key_file
from bastion.budget.calendar import Calendar, zone
from bastion.budget.policy import Budget, Period, capped, effective, from_mapping, parse_budget
from bastion.config import Settings

DAY, WEEK, MONTH = Period.DAY, Period.WEEK, Period.MONTH
SECRET = "s" * 32


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_written_forms() -> None:
    assert parse_budget("day=2000000") == Budget(DAY, 2_000_000)
    assert parse_budget("month=50_000_000") == Budget(MONTH, 50_000_000)
    assert parse_budget("day:Qwen/Qwen2.5-7B-Instruct=100000") == Budget(DAY, 100_000, "Qwen/Qwen2.5-7B-Instruct")
    assert parse_budget("week:ollama:7b=5") == Budget(WEEK, 5, "ollama:7b")  # a model may hold colons
    assert str(Budget(DAY, 5, "qwen")) == "day:qwen=5"
    for bad in ("day", "year=5", "day=-1", "day=lots", "day:=5", "=5"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="twice"):
        from_mapping({"day": 1, "DAY": 2})


def test_defaults_fill_what_the_principal_does_not_set_and_zero_lifts_one() -> None:
    defaults = (Budget(DAY, 1000), Budget(MONTH, 20_000))
    assert effective((), defaults) == defaults
    own = (Budget(DAY, 0), Budget(WEEK, 5000), Budget(DAY, 50, "qwen"))
    assert effective(own, defaults) == (Budget(WEEK, 5000), Budget(DAY, 50, "qwen"), Budget(MONTH, 20_000))


def test_jwt_ceiling_lowers_and_fills_but_never_raises() -> None:
    ceiling = (Budget(DAY, 1000), Budget(MONTH, 10_000))
    claimed = (Budget(DAY, 5000), Budget(WEEK, 3000), Budget(MONTH, 0), Budget(DAY, 10, "qwen"))
    assert set(capped(claimed, ceiling)) == {
        Budget(DAY, 1000),
        Budget(WEEK, 3000),
        Budget(MONTH, 10_000),
        Budget(DAY, 10, "qwen"),
    }
    assert capped((), ceiling) == ceiling
    assert capped((Budget(DAY, 10),), ceiling) == (Budget(DAY, 10), Budget(MONTH, 10_000))


def test_key_file_budgets_reach_the_principal_and_bad_ones_name_the_field() -> None:
    record = {
        "id": "abcd1234",
        "name": "ci",
        "created": "2025-01-01T00:00:00Z",
        "budgets": {"day": 2_000_000, "day:qwen": 100_000},
        "secrets": [{"sha256": "0" * 64, "created": "2025-01-01T00:00:00Z"}],
    }
    principal = parse_key_file(json.dumps({"keys": [record]})).keys[0].principal()
    assert set(principal.budgets) == {Budget(DAY, 2_000_000), Budget(DAY, 100_000, "qwen")}
    record["budgets"] = {"fortnight": 5}
    with pytest.raises(KeyStoreError, match=r"keys\[0\] \(id abcd1234\)\.budgets: .*day, week or month"):
        parse_key_file(json.dumps({"keys": [record]}))


async def test_jwt_budgets_claim_capped_by_the_ceiling() -> None:
    settings = Settings(_env_file=None, jwt_secret=SECRET, jwt_max_budgets="day=1000,month=50000")  # type: ignore[call-arg]
    verifier = JWTVerifier(jwt_config(settings))
    token = mint(SECRET, "alice", 60, budgets={"day": 999_999, "day:qwen": 10})
    principal = await verifier.verify(token)
    assert set(principal.budgets) == {Budget(DAY, 1000), Budget(DAY, 10, "qwen"), Budget(MONTH, 50_000)}
    plain = await verifier.verify(mint(SECRET, "bob", 60))
    assert set(plain.budgets) == {Budget(DAY, 1000), Budget(MONTH, 50_000)}
    for claim in ([1], {"day": "many"}, {"year": 5}):
        forged = jose_jwt.encode({"sub": "eve", "exp": int(ts("2100-01-01T00:00:00+00:00")), "budgets": claim}, SECRET)
        with pytest.raises(AuthFailure):
            await verifier.verify(forged)


def test_settings_name_a_bad_zone_or_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        Settings(_env_file=None, budget_timezone="Mars/Olympus")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="year=5"):
        Settings(_env_file=None, jwt_max_budgets="year=5")  # type: ignore[call-arg]
    settings = Settings(_env_file=None, budget_day=10, budget_month=99, keys_file=tmp_path / "keys.json")  # type: ignore[call-arg]
    options = settings.budget_options()
    assert options.defaults == (Budget(DAY, 10), Budget(MONTH, 99))
    assert (options.db, options.db_is_default) == (tmp_path / "usage.sqlite3", True)


def test_periods_in_utc() -> None:
    windows = Calendar(zone("UTC")).at(ts("2025-06-04T13:45:10+00:00"))  # a Wednesday
    assert windows.hour == ts("2025-06-04T13:00:00+00:00")
    assert windows.starts == (
        ts("2025-06-04T00:00:00+00:00"),
        ts("2025-06-02T00:00:00+00:00"),
        ts("2025-06-01T00:00:00+00:00"),
    )
    assert windows.resets == (
        ts("2025-06-05T00:00:00+00:00"),
        ts("2025-06-09T00:00:00+00:00"),
        ts("2025-07-01T00:00:00+00:00"),
    )
    assert windows.reset_texts[0] == "2025-06-05T00:00:00+00:00"
    december = Calendar(zone("UTC")).at(ts("2025-12-31T23:59:59+00:00"))
    assert december.resets[2] == ts("2026-01-01T00:00:00+00:00")
    assert december.starts[1] == ts("2025-12-29T00:00:00+00:00")  # ISO week 1 of 2026 starts in 2025


def test_periods_in_a_zone_with_dst() -> None:
    paris = Calendar(zone("Europe/Paris"))
    # 2025-03-30 is 23 hours long in Paris: 02:00 jumps to 03:00.
    windows = paris.at(ts("2025-03-30T12:00:00+02:00"))
    assert windows.starts[0] == ts("2025-03-30T00:00:00+01:00")
    assert windows.resets[0] - windows.starts[0] == 23 * 3600
    assert windows.reset_texts[0] == "2025-03-31T00:00:00+02:00"
    kolkata = Calendar(zone("Asia/Kolkata"))  # +05:30: local hours start at :30 UTC
    assert kolkata.at(ts("2025-06-04T10:10:00+00:00")).hour == ts("2025-06-04T09:30:00+00:00")
    assert datetime.fromtimestamp(kolkata.at(ts("2025-06-04T10:10:00+00:00")).starts[0], UTC).hour == 18
