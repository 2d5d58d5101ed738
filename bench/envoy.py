"""JSON through Envoy vs direct gRPC, in one run: `python -m bench.envoy`.

Starts `python -m gateway` (server + Envoy) on free ports and measures, interleaved so that both
paths see the same machine load:
- Tokenize and Embed: the median latency of sequential calls, direct gRPC vs JSON over HTTP/1.1
  through Envoy (one kept-alive connection), and the latency Envoy adds (target < 1 ms);
- Chat: tokens/s of a 128-token greedy stream, direct gRPC vs Server-Sent Events through Envoy
  (target: Envoy >= 0.95 of direct).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.server_process import PROJECT_ROOT, free_port
from clients import GlmClient

CHAT_PROMPT = "Write a long story about a lighthouse keeper."


def start_gateway(log: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, GLM_GRPC_ADDRESS=f"127.0.0.1:{grpc_port}", GLM_HTTP_PORT=str(http_port))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc, f"127.0.0.1:{grpc_port}", http_port
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not become healthy:\n" + log.read_text()[-2000:])


def timed(call: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def json_post(conn: http.client.HTTPConnection, path: str, payload: object) -> None:
    conn.request(
        "POST", path, body=json.dumps(payload), headers={"content-type": "application/json"}
    )
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")


def grpc_chat_tok_s(client: GlmClient, tokens: int) -> float:
    started = time.perf_counter()
    result = client.chat_text([("user", CHAT_PROMPT)], temperature=0.0, max_tokens=tokens)
    return result.usage.completion_tokens / (time.perf_counter() - started)


def sse_chat_tok_s(http_port: int, tokens: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)
    payload = {
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "temperature": 0,
        "max_tokens": tokens,
    }
    started = time.perf_counter()
    conn.request("POST", "/chat", body=json.dumps(payload))
    body = conn.getresponse().read()
    elapsed = time.perf_counter() - started
    conn.close()
    events = [e for e in body.split(b"\n\n") if e and e != b"data: [DONE]"]
    usage = json.loads(events[-1].removeprefix(b"data: "))["usage"]
    return float(usage["completion_tokens"]) / elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.envoy", description=__doc__)
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per unary path")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per chat stream")
    parser.add_argument("--repeats", type=int, default=3, help="chat streams per path")
    args = parser.parse_args(argv)

    log = Path(tempfile.mkdtemp(prefix="glm-bench-envoy-")) / "gateway.log"
    proc, grpc_target, http_port = start_gateway(log)
    rows: list[tuple[str, str, str, str]] = []
    try:
        with GlmClient(grpc_target) as client:
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
            unary = {
                "tokenize": (
                    lambda: client.tokenize("Hello world, how are you today?"),
                    lambda: json_post(conn, "/tokenize", {"prompt": "Hello world, how are you?"}),
                ),
                "embed": (
                    lambda: client.embed(["The cat sits on the mat."]),
                    lambda: json_post(conn, "/embedding", {"prompt": ["The cat sits on the mat."]}),
                ),
            }
            for name, (direct, via_envoy) in unary.items():
                timed(direct, 10)  # warm both paths
                timed(via_envoy, 10)
                grpc_samples: list[float] = []
                json_samples: list[float] = []
                for _ in range(4):  # interleave in blocks so both see the same load
                    grpc_samples += timed(direct, args.calls // 4)
                    json_samples += timed(via_envoy, args.calls // 4)
                g = statistics.median(grpc_samples) * 1000
                j = statistics.median(json_samples) * 1000
                added = j - g
                rows.append((f"{name}: median direct gRPC", f"{g:.2f} ms", "", ""))
                rows.append((f"{name}: median JSON via Envoy", f"{j:.2f} ms", "", ""))
                verdict = "PASS" if added < 1.0 else "FAIL"
                rows.append(
                    (f"{name}: latency added by Envoy", f"{added:.2f} ms", "< 1 ms", verdict)
                )
            conn.close()

            grpc_chat_tok_s(client, 8)  # warm
            direct_rates, envoy_rates = [], []
            for _ in range(args.repeats):
                direct_rates.append(grpc_chat_tok_s(client, args.tokens))
                envoy_rates.append(sse_chat_tok_s(http_port, args.tokens))
            d, e = statistics.median(direct_rates), statistics.median(envoy_rates)
            rows.append(("chat: direct gRPC tok/s", f"{d:.1f}", "", ""))
            rows.append(("chat: SSE via Envoy tok/s", f"{e:.1f}", "", ""))
            verdict = "PASS" if e / d >= 0.95 else "FAIL"
            rows.append(("chat: Envoy tok/s / direct tok/s", f"{e / d:.3f}", ">= 0.95", verdict))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    width = max(len(r[0]) for r in rows)
    print(f"{'metric'.ljust(width)}  {'value':>10}  {'target':>8}  result")
    for metric, value, target, verdict in rows:
        print(f"{metric.ljust(width)}  {value:>10}  {target:>8}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
