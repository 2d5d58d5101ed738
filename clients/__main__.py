"""Command-line front end to glm-api: ``python -m clients [options] <command> ...``.

Commands: ``chat``, ``embed``, ``tokenize``, ``models`` and ``health``; ``--help`` after any of
them lists its options. Exit status: 0 on success, 1 when the server reports an error (printed
as ``error: CODE: message``) or health is not SERVING, 2 for a usage error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Callable, Sequence

import grpc

from clients._transport import (
    API_KEY_ENV,
    DEFAULT_TIMEOUT,
    TARGET_ENV,
    default_target,
    tls_credentials,
)
from clients.errors import GlmClientError
from clients.results import ChatAccumulator
from clients.sync_client import GlmClient

# The environment's equivalents of --tls, --ca-file, --cert-file and --key-file.
TLS_ENV = "GLM_TLS"
CA_FILE_ENV = "GLM_TLS_CA_FILE"
CERT_FILE_ENV = "GLM_TLS_CLIENT_CERT_FILE"
KEY_FILE_ENV = "GLM_TLS_CLIENT_KEY_FILE"

_INT32_MAX = 2**31 - 1
_UINT64_MAX = 2**64 - 1


def _int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high].

    Checking the range here turns an out-of-range value into a usage error instead of a
    protobuf ValueError traceback when the request is built.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    return parse


def _timeout(text: str) -> float | None:
    """An argparse type for --timeout: seconds, with 0 meaning no deadline."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no deadline) or positive")
    return value or None


def _metadata_pair(text: str) -> tuple[str, str]:
    """An argparse type for --metadata KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m clients",
        description="Talk to a glm-api server over gRPC.",
    )
    parser.add_argument(
        "--target",
        help=f"host:port of the server (default: ${TARGET_ENV} or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"deadline of the call in seconds, 0 for none (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--metadata",
        type=_metadata_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="call metadata, e.g. x-request-id=abc; repeatable",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"the API key (default: ${API_KEY_ENV}, which keeps it out of the process list)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=None,
        help=f"connect with TLS (default: ${TLS_ENV}; implied by the three options below)",
    )
    parser.add_argument(
        "--ca-file",
        metavar="PEM",
        help=f"CA certificates to check the server with (default: ${CA_FILE_ENV}, else the "
        "system's)",
    )
    parser.add_argument(
        "--cert-file",
        metavar="PEM",
        help=f"client certificate for mTLS (default: ${CERT_FILE_ENV})",
    )
    parser.add_argument(
        "--key-file", metavar="PEM", help=f"its private key (default: ${KEY_FILE_ENV})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    chat = commands.add_parser("chat", help="stream a chat reply to stdout")
    chat.add_argument("text", help="the user message")
    chat.add_argument("--system", metavar="S", help="a system message to put first")
    chat.add_argument("--model", default="", metavar="M", help="chat model id")
    chat.add_argument("--temperature", type=float, metavar="T")
    chat.add_argument("--top-p", type=float, metavar="P")
    chat.add_argument("--top-k", type=_int_between(0, _INT32_MAX), metavar="K")
    chat.add_argument("--max-tokens", type=_int_between(0, _INT32_MAX), metavar="N")
    chat.add_argument("--seed", type=_int_between(0, _UINT64_MAX), metavar="N")
    chat.add_argument(
        "--stop", nargs="+", action="extend", default=[], metavar="S", help="stop strings"
    )
    chat.set_defaults(handler=_chat)

    embed = commands.add_parser("embed", help="print the embeddings of texts as JSON")
    embed.add_argument("texts", nargs="+", metavar="text")
    embed.add_argument("--model", default="", metavar="M", help="embedding model id")
    embed.add_argument("--normalize", action="store_true", help="scale vectors to unit length")
    embed.set_defaults(handler=_embed)

    tokenize = commands.add_parser("tokenize", help="print the tokens of a text as JSON")
    tokenize.add_argument("text")
    tokenize.add_argument("--model", default="", metavar="M", help="model id")
    tokenize.add_argument("--max-tokens", type=_int_between(0, _INT32_MAX), metavar="N")
    tokenize.set_defaults(handler=_tokenize)

    models = commands.add_parser("models", help="list the models as a table")
    models.set_defaults(handler=_models)

    health = commands.add_parser("health", help="print the health status; exit 1 unless SERVING")
    health.add_argument("--service", default="", metavar="S", help='service name ("": server)')
    health.set_defaults(handler=_health)
    return parser


def _chat(client: GlmClient, args: argparse.Namespace) -> int:
    messages = [("system", args.system)] if args.system is not None else []
    messages.append(("user", args.text))
    accumulator = ChatAccumulator(chunk=True)
    wrote = False
    try:
        with client.chat(
            messages,
            model=args.model,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
            stop=args.stop,
            chunk=True,
        ) as stream:
            for response in stream:
                piece = accumulator.add(response)
                if piece:
                    # Flushing each piece is what makes the reply appear as it is generated
                    # when stdout is a pipe or a file, which are block-buffered.
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    wrote = True
    except (GlmClientError, KeyboardInterrupt):
        if wrote:
            # End the partial reply so that the error message starts on a line of its own.
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    result = accumulator.result()
    usage = result.usage
    print(
        f"finish_reason={result.finish_reason or '-'} prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens} total_tokens={usage.total_tokens}",
        file=sys.stderr,
    )
    return 0


def _float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32, as a float.

    Embeddings are float32 on the wire; printed as doubles they would show noise digits
    (0.1 as 0.10000000149011612) that make the JSON twice as long and no more precise.
    """
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", candidate))[0] == value:
            return candidate
    return value


def _embed(client: GlmClient, args: argparse.Namespace) -> int:
    response = client.embed(args.texts, model=args.model, normalize=args.normalize)
    vectors = [
        [_float32(value) for value in item.values]
        for item in sorted(response.data, key=lambda item: item.index)
    ]
    payload = {"model": response.model, "dimensions": response.dimensions, "vectors": vectors}
    print(json.dumps(payload))
    return 0


def _tokenize(client: GlmClient, args: argparse.Namespace) -> int:
    response = client.tokenize(args.text, model=args.model, max_tokens=args.max_tokens)
    payload = {
        "model": response.model,
        "token_ids": list(response.token_ids),
        "tokens": list(response.tokens),
        "truncated": response.truncated,
    }
    print(json.dumps(payload, ensure_ascii=False))
    return 0


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: int) -> str:
    """Align ``rows`` under ``headers``; the last ``numeric`` columns are right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    first_numeric = len(headers) - numeric
    lines = []
    for row in [headers, *rows]:
        cells = [
            cell.rjust(width) if i >= first_numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _models(client: GlmClient, args: argparse.Namespace) -> int:
    response = client.list_models()

    def number(value: int) -> str:
        # 0 means "does not apply" (dims of a chat model), which a dash says more plainly.
        return str(value) if value else "-"

    rows = [
        [
            model.id,
            model.object,
            "yes" if model.ready else "no",
            "yes" if model.default else "no",
            number(model.dimensions),
            number(model.max_input_tokens),
            number(model.context_length),
        ]
        for model in response.data
    ]
    headers = ["id", "object", "ready", "default", "dims", "max input", "context"]
    print(_format_table(headers, rows, numeric=3))
    return 0


def _health(client: GlmClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from the options, else the environment; None for plaintext."""
    env = os.environ
    ca = args.ca_file or env.get(CA_FILE_ENV) or None
    cert = args.cert_file or env.get(CERT_FILE_ENV) or None
    key = args.key_file or env.get(KEY_FILE_ENV) or None
    tls = args.tls
    if tls is None:
        tls = env.get(TLS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if not (tls or ca or cert or key):
        return None
    return tls_credentials(ca, cert, key)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on --help (0) and on usage errors (2); returning the status instead
        # keeps main() usable from tests and other code.
        return exit_.code if isinstance(exit_.code, int) else 2
    handler: Callable[[GlmClient, argparse.Namespace], int] = args.handler
    try:
        credentials = _credentials(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        with GlmClient(
            args.target or default_target(),
            metadata=args.metadata,
            api_key=args.api_key,
            timeout=args.timeout,
            credentials=credentials,
        ) as client:
            return handler(client, args)
    except GlmClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
