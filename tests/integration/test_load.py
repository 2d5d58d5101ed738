"""Load: many concurrent calls against one in-process server with the real default models.

Bounded in count and time, loopback only. Uses the chat engine only through its public interface
(generate's effects and `stats`), so it holds for any engine behind ChatEngine.

- 32 greedy streams and 64 Embed calls at once, against small limits: every call completes with
  exactly what it gets when run alone, or is refused with RESOURCE_EXHAUSTED; none hangs.
- 50 clients leaving mid-stream: every sequence is freed and memory returns to its level before.
- The metrics endpoint: the families, and counters that move by what a known workload did.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.app import GlmApp
from server.engine.chat import ChatEngine
from tests.conftest import default_specs, engine_idle, free_port, make_settings, serving
from tests.devices import DEFAULT_EMBED_ATOL

pytestmark = pytest.mark.slow

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
# Small limits, so that 32 streams at once overflow them: 8 run, 16 wait, the rest are refused.
MAX_CONCURRENT = 8
MAX_WAITING = 16
# No call may take longer than this; the whole burst is bounded too.
CALL_TIMEOUT_S = 120.0
BURST_TIMEOUT_S = 300.0


def chat_request(content: str, max_tokens: int = 8) -> pb.ChatRequest:
    """A greedy one-message request."""
    return pb.ChatRequest(
        model=CHAT_MODEL,
        messages=[pb.ChatMessage(role="user", content=content)],
        temperature=0.0,
        max_tokens=max_tokens,
    )


@dataclass(slots=True)
class Served:
    app: GlmApp
    stub: pb_grpc.GlmServiceStub


@contextlib.asynccontextmanager
async def serve(**spec_overrides: object) -> AsyncIterator[Served]:
    """A server of its own with the default models, `spec_overrides` and a metrics port."""
    settings = make_settings(metrics_port=free_port())
    async with (
        serving(settings, default_specs(**spec_overrides)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield Served(app, pb_grpc.GlmServiceStub(channel))


@pytest.fixture(scope="module")
async def small() -> AsyncIterator[Served]:
    """One server with small chat limits, shared by the burst and metrics tests."""
    async with serve(max_concurrent=MAX_CONCURRENT, max_waiting=MAX_WAITING) as served:
        yield served


async def stream_text(stub: pb_grpc.GlmServiceStub, request: pb.ChatRequest) -> str:
    """The whole reply of one stream; checks that every chunk belongs to that one call."""
    chunks = [c async for c in stub.Chat(request, timeout=CALL_TIMEOUT_S)]
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= request.max_tokens
    return "".join(c.choices[0].delta.content for c in chunks)


def embedding(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.data], dtype=np.float32)


def engine_of(app: GlmApp) -> ChatEngine:
    return app.registry.chat(CHAT_MODEL)[1]


async def test_concurrent_streams_and_embeds_complete_exactly_or_are_refused(
    small: Served,
) -> None:
    stub = small.stub
    prompts = [f"Name a fruit whose name starts with the letter {chr(65 + i)}." for i in range(26)]
    prompts += [f"What is {i} plus {i}?" for i in range(1, 7)]
    texts = [f"sentence {i}: " + "lorem ipsum dolor " * (i % 9) for i in range(64)]
    assert len(set(prompts)) == 32
    assert len(set(texts)) == 64
    # What each call gets when it runs alone.
    alone_text = [await stream_text(stub, chat_request(p)) for p in prompts]
    alone_vector = [
        embedding(await stub.Embed(pb.EmbedRequest(model=EMBED_MODEL, prompt=[t])))[0]
        for t in texts
    ]
    assert len(set(alone_text)) > 16, "the prompts should give different replies"

    refusals: list[str] = []

    async def one_stream(i: int) -> str | None:
        try:
            return await stream_text(stub, chat_request(prompts[i]))
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            refusals.append(exc.details() or "")
            return None

    async def one_embed(i: int) -> np.ndarray | None:
        try:
            response = await stub.Embed(
                pb.EmbedRequest(model=EMBED_MODEL, prompt=[texts[i]]), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return None
        return embedding(response)[0]

    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(one_stream(i) for i in range(32)), *(one_embed(i) for i in range(64))),
        BURST_TIMEOUT_S,
    )
    elapsed = time.monotonic() - started
    streams, embeds = results[:32], results[32:]
    done = [i for i, text in enumerate(streams) if text is not None]
    refused = 32 - len(done)
    print(
        f"\n32 streams + 64 embeds in {elapsed:.1f} s: {len(done)} streams done, {refused} refused"
    )
    # Each finished stream got exactly its own reply: no tokens of another sequence.
    for i in done:
        assert streams[i] == alone_text[i], f"stream {i} ({prompts[i]!r})"
    # At least every slot's worth ran; past running + waiting, some were refused, with a reason.
    assert len(done) >= MAX_CONCURRENT
    assert refused >= 1
    assert len(refusals) == refused
    assert all(message.strip() for message in refusals), refusals
    for i, vector in enumerate(embeds):
        assert isinstance(vector, np.ndarray), f"embed {i} was refused"
        np.testing.assert_allclose(vector, alone_vector[i], atol=DEFAULT_EMBED_ATOL)
    await wait_until_idle(engine_of(small.app))


async def test_refusals_come_at_once_when_the_queue_is_full(small: Served) -> None:
    """Past max_concurrent + max_waiting, RESOURCE_EXHAUSTED arrives before any token does."""
    stub = small.stub
    calls = [
        stub.Chat(chat_request(f"Write a long story about a town called T{i}.", 64))
        for i in range(MAX_CONCURRENT + MAX_WAITING + 4)
    ]
    refused: list[float] = []
    started = time.monotonic()

    async def first(call: grpc.aio.UnaryStreamCall[pb.ChatRequest, pb.ChatResponse]) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused.append(time.monotonic() - started)

    tasks = [asyncio.create_task(first(c)) for c in calls]
    # The waiting calls would take minutes to start; the refusals must not wait for them.
    await asyncio.wait(tasks, timeout=10)
    for call in calls:
        call.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks), BURST_TIMEOUT_S)
    print(f"\n{len(refused)} of {len(calls)} refused, within {max(refused, default=0):.2f} s")
    assert len(refused) >= 4
    # "At once": long before a single 64-token reply could have finished and freed a slot.
    assert max(refused) < 5.0
    await wait_until_idle(engine_of(small.app))


async def wait_until_idle(engine: ChatEngine, limit_s: float = 60.0) -> None:
    """Until no sequence runs or waits, twice in a row (cancellations reach the server late)."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    while quiet < 2:
        assert time.monotonic() < deadline, f"engine still busy: {engine.stats}"
        await engine_idle(engine, deadline - time.monotonic())
        stats = engine.stats
        quiet = quiet + 1 if (stats.running, stats.waiting) == (0, 0) else 0
        await asyncio.sleep(0.2)


def rss_after_gc() -> int:
    """This process's resident memory once garbage is collected and freed heap is returned."""
    gc.collect()
    # glibc keeps freed memory in its arenas; trimming makes RSS follow what is really in use.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


# A story prompt of about 120 tokens: long enough that each sequence's key/value cache counts.
STORY = (
    "You are a storyteller. Tell a long, detailed story about a lighthouse keeper named {name} "
    "who lives on a rocky island in the north sea, with a cat, a radio, a garden of potatoes, "
    "a boat that leaks, a brother in the city who writes letters every month, and a secret "
    "that the whole village on the mainland wants to learn. Describe the weather, the sea, the "
    "light, the sounds at night and every visitor who comes to the island in one year."
)
CLIENTS = 50
# Memory margin after the burst, against the level after an identical warm-up burst. The
# key/value cache of one SmolLM2-135M token is 30 layers x 2 x 3 heads x 64 x 4 bytes = 45 KiB;
# each of the 50 sequences holds ~125 tokens when it is dropped, so leaking them all would keep
# ~280 MB. 100 MB is well under that (more than a third of the sequences leaked fails), and well
# over the noise: allocator pools that the warm-up has not grown yet, thread stacks, gRPC buffers.
MARGIN_BYTES = 100 * 1024 * 1024


async def leave_mid_stream(stub: pb_grpc.GlmServiceStub, i: int, burst: int) -> int:
    """Start a long reply, read two chunks, hang up; returns the chunks read."""
    request = chat_request(STORY.format(name=f"Keeper {burst}-{i}"), max_tokens=64)
    call = stub.Chat(request, timeout=CALL_TIMEOUT_S)
    read = 0
    try:
        async for _ in call:
            read += 1
            if read == 2:
                break
    finally:
        call.cancel()
    return read


async def test_clients_leaving_mid_stream_free_their_sequences_and_memory() -> None:
    async with serve(max_concurrent=MAX_CONCURRENT, max_waiting=64) as served:
        engine = engine_of(served.app)
        metrics = served.app.metrics
        rss: list[int] = []
        for burst in range(2):  # the first warms up allocators and pools; the second is measured
            rss.append(rss_after_gc())
            read = await asyncio.wait_for(
                asyncio.gather(*(leave_mid_stream(served.stub, i, burst) for i in range(CLIENTS))),
                BURST_TIMEOUT_S,
            )
            assert read == [2] * CLIENTS, "every client should have left mid-stream"
            await wait_until_idle(engine)
        rss.append(rss_after_gc())
        # The server saw every one of them go: 100 cancelled calls, none finished.
        cancelled = metrics.registry.get_sample_value(
            "glm_requests_total", {"rpc": "glm.v1.GlmService/Chat", "status": "CANCELLED"}
        )
        running = metrics.registry.get_sample_value(
            "glm_chat_running_sequences", {"model": CHAT_MODEL}
        )
    mib = [f"{r / 2**20:.0f}" for r in rss]
    print(f"\nRSS (MiB) before the warm-up burst, before and after the measured burst: {mib}")
    assert cancelled == 2 * CLIENTS
    assert running == 0
    assert rss[2] - rss[1] < MARGIN_BYTES, f"memory grew by {(rss[2] - rss[1]) / 2**20:.0f} MiB"


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of the metrics endpoint: {sample name: {sorted labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers.get_content_type() == "text/plain"
        text = reply.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        samples.setdefault(family.name + " (family)", {})
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def sample(
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


FAMILIES = (
    "glm_requests",
    "glm_request_duration_seconds",
    "glm_chat_time_to_first_token_seconds",
    "glm_generated_tokens",
    "glm_prompt_tokens",
    "glm_chat_tokens_per_second",
    "glm_chat_running_sequences",
    "glm_chat_waiting_requests",
    "glm_embed_waiting_prompts",
    "glm_chat_prefix_cache_hits",
    "glm_chat_prefix_cache_tokens_saved",
    "glm_engine_pass_sequences",
    "glm_engine_pass_tokens",
    "glm_engine_pass_padded_tokens",
    "glm_engine_pass_seconds",
    "process_resident_memory_bytes",
)


async def test_metrics_endpoint_counts_a_known_workload(small: Served) -> None:
    port = small.app.metrics_port
    assert port > 0
    stub = small.stub
    await wait_until_idle(engine_of(small.app))
    before = await asyncio.to_thread(scrape, port)
    for family in FAMILIES:
        assert family + " (family)" in before, family

    for word in ("one", "two", "three"):
        await stub.Tokenize(pb.TokenizeRequest(prompt=word))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(pb.TokenizeRequest(prompt="four", max_tokens=0))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    chunks = [c async for c in stub.Chat(chat_request("Say hello."), timeout=CALL_TIMEOUT_S)]
    usage = chunks[-1].usage
    embedded = await stub.Embed(pb.EmbedRequest(model=EMBED_MODEL, prompt=["a", "b c d"]))
    await asyncio.sleep(0.2)  # the interceptor counts as the handlers unwind
    after = await asyncio.to_thread(scrape, port)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    tokenize = "glm.v1.GlmService/Tokenize"
    chat = "glm.v1.GlmService/Chat"
    assert moved("glm_requests_total", rpc=tokenize, status="OK") == 3
    assert moved("glm_requests_total", rpc=tokenize, status="INVALID_ARGUMENT") == 1
    assert moved("glm_requests_total", rpc=chat, status="OK") == 1
    assert moved("glm_request_duration_seconds_count", rpc=tokenize) == 4
    assert moved("glm_request_duration_seconds_count", rpc=chat) == 1
    assert moved("glm_chat_time_to_first_token_seconds_count", model=CHAT_MODEL) == 1
    assert moved("glm_generated_tokens_total", model=CHAT_MODEL) == usage.completion_tokens > 0
    assert moved("glm_prompt_tokens_total", model=CHAT_MODEL) == usage.prompt_tokens > 0
    assert moved("glm_prompt_tokens_total", model=EMBED_MODEL) == embedded.usage.prompt_tokens
    # The embedding batcher reported its passes: all the Embed call's tokens went through them.
    embed_pass = {"model": EMBED_MODEL, "phase": "embed"}
    assert moved("glm_engine_pass_sequences_sum", **embed_pass) == 2
    assert moved("glm_engine_pass_tokens_sum", **embed_pass) == embedded.usage.prompt_tokens
    assert moved("glm_engine_pass_seconds_count", **embed_pass) >= 1
    assert sample(after, "glm_chat_running_sequences", model=CHAT_MODEL) == 0
    assert sample(after, "glm_chat_waiting_requests", model=CHAT_MODEL) == 0
    assert sample(after, "glm_embed_waiting_prompts", model=EMBED_MODEL) == 0
    assert sample(after, "process_resident_memory_bytes") > 0
