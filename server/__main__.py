"""`python -m server`: serve glm.v1.GlmService with the configured models.

`python -m server keys add NAME` creates an API key instead (server/auth/cli.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from server.config import ConfigError
from server.logs import configure_logging
from server.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, configure logging, serve until a signal; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["keys"]:
        from server.auth.cli import main as keys_main

        return keys_main(args[1:])
    try:
        settings = load_settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # Compiled decode passes (compile_decode) keep their graphs with the other cached artefacts;
    # an operator's own TORCHINDUCTOR_CACHE_DIR wins.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "torchinductor"))
    from server.app import serve  # imports torch: after logging is set up

    try:
        return asyncio.run(serve(settings))
    except ConfigError as exc:
        logging.getLogger("server").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
