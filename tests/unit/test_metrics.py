"""The call record, the request log line and the RPC metrics, around a stand-in servicer.

The servicer records into `current_call()` as GlmService does; the interceptor must turn that into
one log line per call and the right counter, histogram and status for every way a call can end.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.errors import InvalidArgumentError
from server.metrics import CallRecord, Metrics, MetricsServer, current_call
from server.settings import load_settings
from server.transport.grpc_server import Health, build_server

TOKENIZE = "glm.v1.GlmService/Tokenize"
CHAT = "glm.v1.GlmService/Chat"


class RecordingService(pb_grpc.GlmServiceServicer):
    """Records model and usage the way GlmService does; the request says how to end."""

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        call = current_call()
        call.note_model("tok-model")
        if request.prompt == "bad":
            raise InvalidArgumentError("bad prompt")
        if request.prompt == "answered":  # an error the handler answers itself (the gateway)
            call.note_status("RESOURCE_EXHAUSTED")
        if request.prompt == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return pb.TokenizeResponse(tokens=[request.prompt])

    async def Chat(self, request: pb.ChatRequest, context: Any) -> AsyncIterator[pb.ChatResponse]:
        call = current_call()
        call.note_model("chat-model")
        await asyncio.sleep(0.02)  # "prefill"
        call.note_first_token()
        yield pb.ChatResponse(id="1")
        for _ in range(4):
            await asyncio.sleep(0.01)
            yield pb.ChatResponse(id="more")
        if request.model == "slow":
            await asyncio.sleep(30)
        call.note_usage(7, 5)
        yield pb.ChatResponse(id="last")


@pytest.fixture
async def served() -> AsyncIterator[tuple[pb_grpc.GlmServiceStub, Metrics]]:
    metrics = Metrics()
    server = build_server(RecordingService(), Health(), max_message_bytes=1 << 20, metrics=metrics)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.GlmServiceStub(channel), metrics
    await server.stop(0)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def request_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "server.requests" and hasattr(r, "rpc")]


async def test_a_call_gives_one_log_line_with_id_model_tokens_status_duration(
    served: tuple[pb_grpc.GlmServiceStub, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    stub, _ = served
    with caplog.at_level(logging.INFO, logger="server.requests"):
        replies = [
            r async for r in stub.Chat(pb.ChatRequest(), metadata=(("x-request-id", "req-42"),))
        ]
        await asyncio.sleep(0.05)  # the line is written as the handler unwinds
    assert len(replies) == 6
    [line] = request_lines(caplog)
    fields = line.__dict__
    assert fields["rpc"] == CHAT
    assert fields["status"] == "OK"
    assert fields["request_id"] == "req-42"
    assert fields["model"] == "chat-model"
    assert (fields["tokens_in"], fields["tokens_out"]) == (7, 5)
    assert fields["duration_ms"] >= fields["ttft_ms"] >= 20
    message = line.getMessage()
    assert message.startswith(f"{CHAT} OK ")
    assert "id=req-42 model=chat-model tokens_in=7 tokens_out=5" in message


async def test_request_ids_are_made_up_when_missing_or_unsafe(
    served: tuple[pb_grpc.GlmServiceStub, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    stub, _ = served
    with caplog.at_level(logging.INFO, logger="server.requests"):
        await stub.Tokenize(pb.TokenizeRequest(prompt="a"))
        for unsafe in ('a b="c"', "x" * 200):
            metadata = (("x-request-id", unsafe),)
            await stub.Tokenize(pb.TokenizeRequest(prompt="b"), metadata=metadata)
        await asyncio.sleep(0.05)
    ids = [r.__dict__["request_id"] for r in request_lines(caplog)]
    assert len(ids) == 3
    assert len(set(ids)) == 3
    assert all(len(i) == 32 and i.isalnum() for i in ids)
    assert all(r.__dict__["tokens_in"] is None for r in request_lines(caplog))


async def test_requests_are_counted_by_rpc_and_final_status(
    served: tuple[pb_grpc.GlmServiceStub, Metrics],
) -> None:
    stub, metrics = served
    for _ in range(3):
        await stub.Tokenize(pb.TokenizeRequest(prompt="ok"))
    for prompt, code in (("bad", "INVALID_ARGUMENT"), ("abort", "PERMISSION_DENIED")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Tokenize(pb.TokenizeRequest(prompt=prompt))
        assert err.value.code().name == code
    # Answered with an error inside an OK call: counted under the error's status.
    await stub.Tokenize(pb.TokenizeRequest(prompt="answered"))
    await asyncio.sleep(0.05)
    counts = {
        status: value(metrics, "glm_requests_total", rpc=TOKENIZE, status=status)
        for status in ("OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED")
    }
    assert counts == {
        "OK": 3,
        "INVALID_ARGUMENT": 1,
        "PERMISSION_DENIED": 1,
        "RESOURCE_EXHAUSTED": 1,
    }
    assert value(metrics, "glm_request_duration_seconds_count", rpc=TOKENIZE) == 6


async def test_chat_metrics_time_to_first_token_tokens_and_rate(
    served: tuple[pb_grpc.GlmServiceStub, Metrics],
) -> None:
    stub, metrics = served
    for _ in range(2):
        _ = [r async for r in stub.Chat(pb.ChatRequest())]
    await asyncio.sleep(0.05)
    model = {"model": "chat-model"}
    assert value(metrics, "glm_chat_time_to_first_token_seconds_count", **model) == 2
    # Both first tokens came after the 20 ms "prefill": none in the 10 ms bucket.
    assert value(metrics, "glm_chat_time_to_first_token_seconds_bucket", le="0.01", **model) == 0
    assert value(metrics, "glm_generated_tokens_total", **model) == 10
    assert value(metrics, "glm_prompt_tokens_total", **model) == 14
    assert value(metrics, "glm_chat_tokens_per_second_count", **model) == 2
    # 4 tokens after the first in >= 40 ms: at most 100 tokens/s.
    assert value(metrics, "glm_chat_tokens_per_second_bucket", le="100.0", **model) == 2


async def test_a_client_leaving_mid_stream_is_counted_as_cancelled(
    served: tuple[pb_grpc.GlmServiceStub, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    stub, metrics = served
    with caplog.at_level(logging.INFO, logger="server.requests"):
        call = stub.Chat(pb.ChatRequest(model="slow"))
        async for _ in call:
            break
        call.cancel()
        for _ in range(100):
            if value(metrics, "glm_requests_total", rpc=CHAT, status="CANCELLED"):
                break
            await asyncio.sleep(0.02)
    assert value(metrics, "glm_requests_total", rpc=CHAT, status="CANCELLED") == 1
    assert value(metrics, "glm_requests_total", rpc=CHAT, status="OK") == 0
    # No usage for a call that never finished, but its first token was timed.
    assert value(metrics, "glm_generated_tokens_total", model="chat-model") == 0
    assert value(metrics, "glm_chat_time_to_first_token_seconds_count", model="chat-model") == 1
    [line] = request_lines(caplog)
    assert line.__dict__["status"] == "CANCELLED"


def test_every_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    record = CallRecord(rpc=TOKENIZE)
    first.observe_call(record, "OK", record.started + 0.5)
    assert value(first, "glm_requests_total", rpc=TOKENIZE, status="OK") == 1
    assert value(second, "glm_requests_total", rpc=TOKENIZE, status="OK") == 0


def test_engine_observer_and_queue_gauges() -> None:
    class Stats:
        running = 3
        waiting = 5
        prefix_cache_hits = 2
        prefix_cache_tokens_saved = 300

    metrics = Metrics()
    metrics.watch_queues(lambda: {"chat-model": Stats()}, lambda: {"embed-model": 7})
    observer = metrics.observer("embed-model")
    observer.forward_pass(phase="embed", sequences=4, tokens=30, padded_tokens=40, seconds=0.01)
    labels = {"model": "embed-model", "phase": "embed"}
    assert value(metrics, "glm_engine_pass_sequences_sum", **labels) == 4
    assert value(metrics, "glm_engine_pass_tokens_sum", **labels) == 30
    assert value(metrics, "glm_engine_pass_padded_tokens_sum", **labels) == 40
    assert value(metrics, "glm_engine_pass_seconds_count", **labels) == 1
    assert value(metrics, "glm_chat_running_sequences", model="chat-model") == 3
    assert value(metrics, "glm_chat_waiting_requests", model="chat-model") == 5
    assert value(metrics, "glm_embed_waiting_prompts", model="embed-model") == 7
    assert value(metrics, "glm_chat_prefix_cache_hits_total", model="chat-model") == 2
    assert value(metrics, "glm_chat_prefix_cache_tokens_saved_total", model="chat-model") == 300


def test_metrics_server_serves_the_text_format_and_frees_its_port() -> None:
    metrics = Metrics()
    metrics.observe_call(CallRecord(rpc=TOKENIZE), "OK", 0.0)
    server = MetricsServer(metrics, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "process_resident_memory_bytes" in families
    [sample] = [s for s in families["glm_requests"].samples if s.name == "glm_requests_total"]
    assert sample.labels == {"rpc": TOKENIZE, "status": "OK"}
    assert sample.value == 1
    with pytest.raises(OSError, match="refused"):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_metrics_port_setting() -> None:
    assert load_settings([], {}).metrics_port == 0
    assert load_settings([], {"GLM_METRICS_PORT": "9464"}).metrics_port == 9464
    flag = load_settings(["--metrics-port", "9500"], {"GLM_METRICS_PORT": "9464"})
    assert flag.metrics_port == 9500
    with pytest.raises(ValueError, match="metrics_port"):
        load_settings([], {"GLM_METRICS_PORT": "70000"})
