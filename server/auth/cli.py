"""`python -m server keys ...`: create API keys (the server never sees or stores the keys)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from server.auth.keys import KeysFileError, append_key, load_keys

_FILE_ENV = "GLM_API_KEYS_FILE"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server keys", description="Manage the API keys file (GLM_API_KEYS_FILE)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    add = commands.add_parser(
        "add", help="create a key, print it once, append its SHA-256 to the file"
    )
    add.add_argument("name", help="the key's name, as logs and metrics show it")
    add.add_argument(
        "--models", metavar="ID,ID", help="the only models the key may use (default: all)"
    )
    add.add_argument("--requests-per-minute", type=int, metavar="N")
    add.add_argument("--tokens-per-minute", type=int, metavar="N")
    listing = commands.add_parser("list", help="list the keys' names, models and limits")
    for sub in (add, listing):
        sub.add_argument(
            "--file", type=Path, help=f"the keys file (default: ${_FILE_ENV}); created if missing"
        )
    return parser


def main(argv: Sequence[str]) -> int:
    """Run a keys command; returns the exit code."""
    args = _parser().parse_args(argv)
    path = args.file or (Path(os.environ[_FILE_ENV]) if os.environ.get(_FILE_ENV) else None)
    if path is None:
        print(f"error: give --file PATH or set {_FILE_ENV}", file=sys.stderr)
        return 2
    try:
        if args.command == "add":
            allowed = [m.strip() for m in (args.models or "").split(",") if m.strip()]
            key = append_key(
                path,
                args.name,
                models=allowed or None,
                requests_per_minute=args.requests_per_minute,
                tokens_per_minute=args.tokens_per_minute,
            )
            print(
                f"added key {args.name!r} to {path}. The key is shown only this once; "
                "the file keeps its SHA-256:",
                file=sys.stderr,
            )
            print(key)
            return 0
        for entry in load_keys(path):
            models = "all models" if entry.models is None else ", ".join(sorted(entry.models))
            limits = [
                f"{value} {unit}/min"
                for value, unit in (
                    (entry.requests_per_minute, "requests"),
                    (entry.tokens_per_minute, "tokens"),
                )
                if value is not None
            ]
            print(f"{entry.name}\t{models}\t{', '.join(limits) or 'no limits'}")
        return 0
    except KeysFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
