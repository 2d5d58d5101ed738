"""The streams benchmark's bookkeeping and its OpenAI-compatible peer client.

Workloads are built from synthetic samples, so the ratios and verdicts are known exactly; the
peer client talks to a small Server-Sent Events server on a free port. Running the real servers
is the benchmark's job (`make bench`), not the test suite's.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench.defaults import STREAMS_SCALING_TARGET
from bench.load import BUSY_CORES_LIMIT
from bench.report import Metric, percentile
from bench.streams import GLM, Peer, StreamSample, StreamsResults, Workload, openai_call

_MIB = 1024 * 1024


def _workload(
    server: str, streams: int, seconds: float, ttft_s: float, rss_mib: int | None, busy: float = 0.0
) -> Workload:
    """`streams` streams of 100 tokens, all sent at 0 and ended at `seconds`."""
    samples = [
        StreamSample(i, 0.0, ttft_s, seconds, 100, 40, "length", f"reply {i}")
        for i in range(streams)
    ]
    rss = None if rss_mib is None else rss_mib * _MIB
    return Workload(server, streams, samples, peak_rss_bytes=rss, background_cores=busy)


def _by_name(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


def _results(one_s: float, eight_s: float, busy: float = 0.0) -> StreamsResults:
    results = StreamsResults(model="m", tokens=100, compared=8)
    results.runs[GLM] = {
        1: _workload(GLM, 1, one_s, 0.1, 1000),
        8: _workload(GLM, 8, eight_s, 0.5, 1100, busy),
    }
    return results


def test_scaling_is_eight_streams_over_one_and_judged() -> None:
    # One stream: 100 tokens in 4 s = 25 tok/s; eight: 800 in 8 s = 100 tok/s, 4x: PASS.
    passing = _by_name(_results(4.0, 8.0).metrics())
    scaling = passing["streams: glm-api aggregate tok/s, 8 streams / 1"]
    assert scaling.value == pytest.approx(4.0)
    assert scaling.target == STREAMS_SCALING_TARGET
    assert scaling.verdict == "PASS"
    assert passing["streams x8: glm-api aggregate"].value == pytest.approx(100.0)
    assert passing["streams x8: glm-api peak RSS"].value == pytest.approx(1100.0)
    # 800 in 10 s = 80 tok/s: 3.2x, measured on a busy machine.
    failing = _by_name(_results(4.0, 10.0, busy=BUSY_CORES_LIMIT + 0.5).metrics())
    assert failing["streams: glm-api aggregate tok/s, 8 streams / 1"].verdict == "FAIL*"
    assert failing["streams x8: glm-api aggregate"].noisy
    assert not failing["streams x1: glm-api aggregate"].noisy


def test_each_peer_gets_its_own_ratios_per_count() -> None:
    results = _results(4.0, 8.0)
    results.runs["peer"] = {
        1: _workload("peer", 1, 2.0, 0.05, None),  # 50 tok/s
        8: _workload("peer", 8, 16.0, 1.0, None),  # 50 tok/s
    }
    metrics = _by_name(results.metrics())
    assert metrics["streams x1: glm-api / peer aggregate tok/s"].value == pytest.approx(0.5)
    assert metrics["streams x8: glm-api / peer aggregate tok/s"].value == pytest.approx(2.0)
    assert metrics["streams x8: glm-api / peer time to first token p50"].value == pytest.approx(0.5)
    # The peer's memory is unknown (no process id): the ratio is not measured.
    assert metrics["streams x8: glm-api / peer peak RSS"].verdict == "n/a"
    replies = metrics["streams x8: glm-api / peer: greedy replies identical"]
    assert (replies.value, replies.unit) == (8, "of 8")
    assert results.as_dict()["identical_replies"] == {"peer": {1: (1, 1), 8: (8, 8)}}


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_peer_is_parsed_from_name_and_base_url() -> None:
    peer = Peer.parse("llama-server=http://127.0.0.1:8080/v1/")
    assert (peer.name, peer.base_url, peer.pid) == (
        "llama-server",
        "http://127.0.0.1:8080/v1",
        None,
    )
    bad_ones = ("http://127.0.0.1:8080/v1", "x=ftp://h:1/v1", "x=http://:1/v1", "x=http://h:p/v1")
    for bad in bad_ones:
        with pytest.raises(ValueError, match="NAME=http"):
            Peer.parse(bad)


class _SseHandler(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions with three words, or with a 500 when asked for "fail"."""

    requests: list[dict[str, Any]] = []  # noqa: RUF012 (the test reads what came in)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        if body["messages"][0]["content"] == "fail":
            self.send_response(500)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"oops")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events: list[dict[str, Any]] = [
            {"choices": [{"delta": {"content": word}, "finish_reason": None}]}
            for word in ("one", " two", " three")
        ]
        events.append({"choices": [{"delta": {}, "finish_reason": "length"}]})
        events.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
        for event in events:
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def sse_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SseHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _SseHandler.requests.clear()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_peer_client_reads_a_streamed_completion(sse_server: int) -> None:
    call = openai_call(Peer("p", f"http://127.0.0.1:{sse_server}/v1", model="m1"))
    sample = call(3, "hello", 3)
    assert sample.error == ""
    assert (sample.stream, sample.text, sample.finish_reason) == (3, "one two three", "length")
    assert (sample.prompt_tokens, sample.completion_tokens) == (7, 3)
    assert sample.first_at is not None
    assert sample.sent_at <= sample.first_at <= sample.ended_at
    request = _SseHandler.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert (request["model"], request["temperature"], request["stream"]) == ("m1", 0, True)
    assert request["max_tokens"] == 3


def test_the_peer_client_reports_an_http_error(sse_server: int) -> None:
    sample = openai_call(Peer("p", f"http://127.0.0.1:{sse_server}/v1"))(0, "fail", 3)
    assert sample.error == "HTTP 500: oops"
    assert sample.completion_tokens == 0
    assert "model" not in _SseHandler.requests[-1]


def test_a_peers_process_is_the_one_listening_on_its_port(sse_server: int) -> None:
    # The test's SSE server listens in this very process.
    peer = Peer("p", f"http://127.0.0.1:{sse_server}/v1").with_listening_pid()
    assert peer.pid == os.getpid()
    assert peer.peak_rss_bytes() is not None
    known = Peer("p", f"http://127.0.0.1:{sse_server}/v1", pid=1)
    assert known.with_listening_pid() is known
