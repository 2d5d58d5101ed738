"""`python -m gateway`: run the server and Envoy together (what `make run` does).

`python -m gateway render [--compose | --kubernetes]` prints the Envoy config instead: for this
machine's settings, for docker-compose (envoy/envoy.compose.yaml is that output), or for
Kubernetes (deploy/kubernetes/base/envoy/envoy.yaml).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gateway.envoy_config import (
    compose_target,
    kubernetes_target,
    render,
    target_from_settings,
)
from server.logs import configure_logging
from server.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `render` or run both processes; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["render"]:
        compose, kubernetes = "--compose" in args, "--kubernetes" in args
        rest = [a for a in args[1:] if a not in ("--compose", "--kubernetes")]
        settings = load_settings(rest)
        if kubernetes:
            target = kubernetes_target(settings)
        elif compose:
            target = compose_target(settings)
        else:
            target = target_from_settings(settings)
        sys.stdout.write(render(target))
        return 0
    try:
        settings = load_settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from gateway.supervisor import Supervisor

    return Supervisor(settings).run()


if __name__ == "__main__":
    sys.exit(main())
