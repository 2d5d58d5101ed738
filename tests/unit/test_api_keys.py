"""The API keys file: parsing, matching, appending (`python -m server keys`), reloading."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from server.__main__ import main as server_main
from server.auth.keys import (
    KEY_PREFIX,
    KeysFileError,
    KeyStore,
    append_key,
    key_digest,
    load_keys,
    match_key,
    parse_keys,
)

SHA_A = hashlib.sha256(b"key-a").hexdigest()
SHA_B = hashlib.sha256(b"key-b").hexdigest()


def entry(name: str, sha: str, extra: str = "") -> str:
    return f'[[keys]]\nname = "{name}"\nsha256 = "{sha}"\n{extra}\n'


def test_a_file_of_keys_parses_with_its_models_and_limits() -> None:
    keys = parse_keys(
        entry("a", SHA_A, 'models = ["m1", "m2"]\nrequests_per_minute = 10')
        + entry("b", SHA_B.upper(), "tokens_per_minute = 500")
    )
    assert [k.name for k in keys] == ["a", "b"]
    assert keys[0].models == frozenset({"m1", "m2"})
    assert keys[0].requests_per_minute == 10
    assert keys[0].tokens_per_minute is None
    assert keys[1].models is None
    assert keys[1].tokens_per_minute == 500
    assert keys[1].digest == key_digest("key-b")
    assert parse_keys("") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[keys]\n", "not valid TOML"),
        ("[other]\nx = 1\n", "unknown top-level"),
        ('keys = "x"\n', "array of tables"),
        (entry("a", SHA_A, "colour = 1"), "unknown fields"),
        (entry("bad name", SHA_A), "name must be"),
        (entry("a", "abc"), "64 hex digits"),
        (entry("a", SHA_A) + entry("a", SHA_B), "used twice"),
        (entry("a", SHA_A) + entry("b", SHA_A), "listed twice"),
        (entry("a", SHA_A, "models = 'm1'"), "list of model ids"),
        (entry("a", SHA_A, "requests_per_minute = 0"), "positive integer"),
        (entry("a", SHA_A, "tokens_per_minute = 1.5"), "positive integer"),
        (entry("a", SHA_A, "requests_per_minute = true"), "positive integer"),
    ],
)
def test_bad_files_are_refused_with_the_entry_named(text: str, message: str) -> None:
    with pytest.raises(KeysFileError, match=message):
        parse_keys(text)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="cannot read the API keys file"):
        load_keys(tmp_path / "nope.toml")


def test_match_finds_the_key_by_its_hash_only() -> None:
    keys = parse_keys(entry("a", SHA_A) + entry("b", SHA_B))
    found_a, found_b = match_key(keys, "key-a"), match_key(keys, "key-b")
    assert found_a is not None
    assert found_a.name == "a"
    assert found_b is not None
    assert found_b.name == "b"
    for wrong in ("key-c", "", "key-a ", SHA_A, "x" * 10_000):
        assert match_key(keys, wrong) is None


def test_append_creates_the_file_and_prints_a_key_once(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    key = append_key(path, "svc-1", models=["m1"], requests_per_minute=5)
    other = append_key(path, "svc-2", tokens_per_minute=7)
    assert key.startswith(KEY_PREFIX)
    assert len(key) > 40
    assert key != other
    text = path.read_text()
    assert key not in text
    assert other not in text
    keys = load_keys(path)
    assert [(k.name, k.models, k.requests_per_minute, k.tokens_per_minute) for k in keys] == [
        ("svc-1", frozenset({"m1"}), 5, None),
        ("svc-2", None, None, 7),
    ]
    assert match_key(keys, key) == keys[0]
    assert match_key(keys, other) == keys[1]


def test_append_refuses_a_duplicate_or_bad_name_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    append_key(path, "svc")
    path.chmod(0o640)
    before = path.read_text()
    with pytest.raises(KeysFileError, match="already has a key named"):
        append_key(path, "svc")
    with pytest.raises(KeysFileError, match="key names are"):
        append_key(path, "a b")
    with pytest.raises(KeysFileError, match="positive integer"):
        append_key(path, "svc-2", requests_per_minute=0)
    assert path.read_text() == before
    append_key(path, "svc-3")
    assert path.stat().st_mode & 0o777 == 0o640  # the file's mode is kept
    assert [k.name for k in load_keys(path)] == ["svc", "svc-3"]


def test_the_keys_command_adds_and_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.toml"
    assert server_main(["keys", "add", "billing", "--file", str(path), "--models", "a,b"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith(KEY_PREFIX)
    assert "shown only this once" in err
    assert match_key(load_keys(path), key) is not None
    monkeypatch.setenv("GLM_API_KEYS_FILE", str(path))
    assert server_main(["keys", "add", "ops", "--requests-per-minute", "60"]) == 0
    capsys.readouterr()
    assert server_main(["keys", "list"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == ["billing\ta, b\tno limits", "ops\tall models\t60 requests/min"]
    assert key not in out
    assert server_main(["keys", "add", "ops"]) == 1
    assert "already has a key" in capsys.readouterr().err
    monkeypatch.delenv("GLM_API_KEYS_FILE")
    assert server_main(["keys", "list"]) == 2


def test_the_store_reloads_a_changed_file_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(entry("a", SHA_A))
    store = KeyStore(path, check_interval_s=0)
    assert store.match("key-a") is not None
    assert store.match("key-b") is None
    path.write_text(entry("a", SHA_A) + entry("b", SHA_B))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert store.match("key-b") is not None
    # A broken edit is ignored: the keys in force stay.
    path.write_text("[[keys]\nname = ")
    assert store.match("key-a") is not None
    assert store.match("key-b") is not None
    path.write_text(entry("b", SHA_B))
    assert store.match("key-a") is None
    assert store.match("key-b") is not None
    # A file that disappears keeps the keys too (a rename in progress).
    path.unlink()
    assert store.match("key-b") is not None
