"""The key store: parsing with clear errors, atomic 0600 writes, rotation, reload keeping the last good set."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from datetime import timedelta
from pathlib import Path

import pytest

from bastion.auth.keys import (
    KeyFile,
    KeyStore,
    KeyStoreError,
    create_key,
    hash_key,
    parse_key_file,
    read_key_file,
    revoke_key,
    rotate_key,
    write_key_file,
)


def _one_key(tmp_path: Path, **policy: object) -> tuple[Path, str, KeyFile]:
    data = KeyFile()
    _, key = create_key(data, name="alice", **policy)  # type: ignore[arg-type]
    path = tmp_path / "keys.json"
    write_key_file(path, data)
    return path, key, data


def test_key_format_and_only_hash_on_disk(tmp_path: Path) -> None:
    path, key, data = _one_key(tmp_path)
    assert key.startswith(f"bst-{data.keys[0].id}_") and len(key) > 50
    text = path.read_text()
    assert key not in text and key.split("_", 1)[1] not in text
    assert hash_key(key) in text
    assert json.loads(text)["keys"][0]["name"] == "alice"


def test_atomic_write_is_owner_only_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path, _, data = _one_key(tmp_path)
    path.chmod(0o644)
    inode = path.stat().st_ino
    write_key_file(path, data)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != inode, "replaced, not rewritten in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


def test_unknown_field_is_a_clear_error() -> None:
    good = {"sha256": "a" * 64, "created": "2026-01-01T00:00:00Z"}
    record = {"id": "abcd1234", "name": "x", "created": "2026-01-01T00:00:00Z", "secrets": [good], "colour": "red"}
    with pytest.raises(KeyStoreError, match=r"keys\[0\] \(id abcd1234\)\.colour: unknown field"):
        parse_key_file(json.dumps({"version": 1, "keys": [record]}))
    with pytest.raises(KeyStoreError, match=r"top level|extra|unknown field"):
        parse_key_file(json.dumps({"version": 1, "keys": [], "owner": "me"}))


def test_bad_cidr_bad_json_and_duplicates_are_clear_errors() -> None:
    good = {"sha256": "a" * 64, "created": "2026-01-01T00:00:00Z"}
    record = {"id": "abcd1234", "name": "x", "created": "2026-01-01T00:00:00Z", "secrets": [good]}
    with pytest.raises(KeyStoreError, match=r"keys\[0\] \(id abcd1234\)\.allow_ips: '10\.0\.0\.0/33' is not a valid"):
        parse_key_file(json.dumps({"keys": [{**record, "allow_ips": ["10.0.0.0/33"]}]}))
    with pytest.raises(KeyStoreError, match="invalid JSON at line 1"):
        parse_key_file("{nope")
    with pytest.raises(KeyStoreError, match="duplicate key id 'abcd1234'"):
        parse_key_file(json.dumps({"keys": [record, record]}))


def test_lookup_expiry_revocation(tmp_path: Path) -> None:
    path, key, data = _one_key(tmp_path, models=["m"], allow_ips=["10.0.0.0/8"], rpm=5)
    store = KeyStore(path)
    entry = store.lookup(key)
    assert entry is not None and not entry.revoked and entry.not_after is None
    assert entry.principal.name == "alice" and entry.principal.models == frozenset({"m"})
    assert entry.principal.rpm == 5 and str(entry.principal.networks[0]) == "10.0.0.0/8"
    assert store.lookup(key + "x") is None and store.lookup("") is None

    revoke_key(data, data.keys[0].id)
    write_key_file(path, data)
    assert store.reload()
    revoked = store.lookup(key)
    assert revoked is not None and revoked.revoked


def test_rotation_with_overlap(tmp_path: Path) -> None:
    path, old, data = _one_key(tmp_path)
    _, new = rotate_key(data, data.keys[0].id, timedelta(hours=24))
    write_key_file(path, data)
    store = KeyStore(path)
    old_entry, new_entry = store.lookup(old), store.lookup(new)
    assert old_entry is not None and new_entry is not None
    assert old_entry.principal == new_entry.principal, "same key, same policy"
    assert old_entry.not_after is not None and 23 * 3600 < old_entry.not_after - time.time() <= 24 * 3600
    assert new_entry.not_after is None
    _, newest = rotate_key(data, data.keys[0].id)  # no overlap: older secrets end now
    write_key_file(path, data)
    store.reload()
    ended = store.lookup(new)
    assert ended is not None and ended.not_after is not None and ended.not_after <= time.time()
    assert store.lookup(newest) is not None


def test_reload_keeps_last_good_set_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, key, _ = _one_key(tmp_path)
    store = KeyStore(path, bootstrap=["bootstrap-key-0123456789"])
    assert store.lookup("bootstrap-key-0123456789") is not None
    path.write_text('{"version": 1, "keys": [{"id": "x"}]}')
    with caplog.at_level(logging.ERROR, "bastion.auth"):
        assert not store.reload()
    assert store.lookup(key) is not None, "the last good set stays"
    assert "keeping the last good set" in caplog.text
    os.chmod(path, 0o644)
    write_key_file(path, read_key_file(tmp_path / "missing.json"))  # empty, valid
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, "bastion.auth"):
        assert store.reload(force=True)
    assert "readable by group or others" in caplog.text
    assert store.lookup(key) is None


def test_broken_file_at_start_up_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("[]")
    with pytest.raises(KeyStoreError, match=r"keys\.json"):
        KeyStore(path)
    assert len(KeyStore(tmp_path / "absent.json")) == 0, "a missing file is an empty store"
