"""The API keys file: a TOML list of keys by name and SHA-256, read again whenever it changes.

    [[keys]]
    name = "billing"                      # what logs and metrics call the key
    sha256 = "9f86d08..."                 # hex SHA-256 of the key: the file holds no secret
    models = ["smollm2-135m-instruct"]    # optional allow-list (default: every model)
    requests_per_minute = 600             # optional limits (default: none)
    tokens_per_minute = 100000

A presented key is hashed and compared with every entry in constant time, so that neither the
time nor the log says which entry, or how much of one, it matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Key names go into log lines and metric labels as they are.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Longer "keys" are not hashed: no key this server makes is near this long.
MAX_KEY_CHARS = 256
# Every generated key starts with this, so that a leaked one is easy to recognise.
KEY_PREFIX = "glm-"
_KEYS_TABLE = "keys"
_ENTRY_FIELDS = {"name", "sha256", "models", "requests_per_minute", "tokens_per_minute"}
# How often, at most, the file's modification time is looked at.
RELOAD_CHECK_S = 0.5


class KeysFileError(ValueError):
    """The keys file cannot be read or says something invalid; the message names the entry."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One entry of the keys file."""

    name: str
    digest: bytes
    # None: every model.
    models: frozenset[str] | None = None
    # None: no limit.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> bytes:
    """The SHA-256 of a key, as the file stores it (in hex)."""
    return hashlib.sha256(key.encode()).digest()


def _positive_int(entry: dict[str, Any], field: str, where: str) -> int | None:
    value = entry.get(field)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise KeysFileError(f"{where}: {field} must be a positive integer, got {value!r}")
    return value


def parse_keys(text: str, source: str = "the keys file") -> tuple[ApiKey, ...]:
    """The keys a keys file's text declares; KeysFileError says what is wrong with it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{source} is not valid TOML: {exc}") from exc
    unknown = set(data) - {_KEYS_TABLE}
    if unknown:
        raise KeysFileError(f"{source}: unknown top-level keys {sorted(unknown)}; use [[keys]]")
    entries = data.get(_KEYS_TABLE, [])
    if not isinstance(entries, list):
        raise KeysFileError(f"{source}: `keys` must be an array of tables ([[keys]])")
    keys: list[ApiKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for index, entry in enumerate(entries):
        where = f"{source}, key #{index + 1}"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: must be a table")
        extra = set(entry) - _ENTRY_FIELDS
        if extra:
            raise KeysFileError(f"{where}: unknown fields {sorted(extra)}")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise KeysFileError(
                f"{where}: name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}"
            )
        where = f"{source}, key {name!r}"
        if name in names:
            raise KeysFileError(f"{where}: the name is used twice")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha.lower()):
            raise KeysFileError(f"{where}: sha256 must be 64 hex digits (the key's SHA-256)")
        digest = bytes.fromhex(sha)
        if digest in digests:
            raise KeysFileError(f"{where}: the same key is listed twice")
        models = entry.get("models")
        if models is not None and (
            not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
        ):
            raise KeysFileError(f"{where}: models must be a list of model ids")
        keys.append(
            ApiKey(
                name=name,
                digest=digest,
                models=None if models is None else frozenset(models),
                requests_per_minute=_positive_int(entry, "requests_per_minute", where),
                tokens_per_minute=_positive_int(entry, "tokens_per_minute", where),
            )
        )
        names.add(name)
        digests.add(digest)
    return tuple(keys)


def load_keys(path: Path) -> tuple[ApiKey, ...]:
    """The keys of the file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeysFileError(f"cannot read the API keys file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise KeysFileError(f"the API keys file {path} is not UTF-8") from exc
    return parse_keys(text, str(path))


def match_key(keys: tuple[ApiKey, ...], presented: str) -> ApiKey | None:
    """The entry whose key is `presented`, or None.

    Every entry is compared, with hmac.compare_digest, whatever matched before: the time taken
    depends on the number of keys only.
    """
    if not presented or len(presented) > MAX_KEY_CHARS:
        return None
    digest = key_digest(presented)
    found: ApiKey | None = None
    for entry in keys:
        if hmac.compare_digest(entry.digest, digest):
            found = entry
    return found


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten or replaced (None: it is gone)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class KeyStore:
    """The keys of one file, read again when it changes (checked at most every RELOAD_CHECK_S).

    A change that does not parse is logged and ignored: the keys read last stay in force, so a
    half-written file never locks everyone out or lets everyone in.
    """

    def __init__(self, path: Path, check_interval_s: float = RELOAD_CHECK_S) -> None:
        self.path = path
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._signature = _signature(path)
        self._keys = load_keys(path)  # a bad file at start is the caller's error to report
        self._next_check = time.monotonic() + check_interval_s
        log.info("API keys: %d loaded from %s", len(self._keys), path)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        """The keys in force, after looking for a change of the file if it is time to."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check_interval_s
            self._reload_if_changed()
        return self._keys

    def _reload_if_changed(self) -> None:
        signature = _signature(self.path)
        if signature == self._signature:
            return
        with self._lock:
            if signature == self._signature:
                return
            self._signature = signature
            try:
                keys = load_keys(self.path)
            except KeysFileError as exc:
                log.error("API keys: keeping the %d keys in force: %s", len(self._keys), exc)
                return
            self._keys = keys
            log.info("API keys: %d loaded from %s (the file changed)", len(keys), self.path)

    def match(self, presented: str) -> ApiKey | None:
        """The entry of a presented key, or None."""
        return match_key(self.keys, presented)


def _toml_string(value: str) -> str:
    # A TOML basic string; callers pass printable text only (no control characters to escape).
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def append_key(
    path: Path,
    name: str,
    *,
    models: list[str] | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
) -> str:
    """Create a key named `name`, append its entry to the file (created if missing), return it.

    The file is checked before and after: a name already there, or an entry the server would
    refuse, leaves it unchanged.
    """
    existing = load_keys(path) if path.exists() else ()
    if not NAME_PATTERN.fullmatch(name):
        raise KeysFileError(f"key names are 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    if any(entry.name == name for entry in existing):
        raise KeysFileError(f"{path} already has a key named {name!r}")
    key = new_key()
    lines = ["[[keys]]", f"name = {_toml_string(name)}", f'sha256 = "{key_digest(key).hex()}"']
    if models:
        if not all(m and m.isprintable() for m in models):
            raise KeysFileError(f"model ids must be printable text, got {models!r}")
        lines.append(f"models = [{', '.join(_toml_string(m) for m in models)}]")
    for field, limit in (
        ("requests_per_minute", requests_per_minute),
        ("tokens_per_minute", tokens_per_minute),
    ):
        if limit is not None:
            if limit < 1:
                raise KeysFileError(f"{field} must be a positive integer, got {limit}")
            lines.append(f"{field} = {limit}")
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    separator = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
    new = old + separator + "\n".join(lines) + "\n"
    parse_keys(new, str(path))  # what the server will read
    # Written beside and renamed over, so that a server reading the file never sees half of it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)
    return key
