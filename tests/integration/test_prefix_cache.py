"""The prefix cache: cached prompt blocks give the same bits as computing them, within a budget.

Three parts:
- `PrefixCache` alone: block keys chain their prefix, lookups find the longest cached run, and
  eviction keeps to the budget, least recently used leaves first.
- `SlotBatch` on a tiny Llama: a prompt started from copied blocks gets the logits, bit for bit,
  of the same prompt computed in the same chunks, and so do the decode steps after it.
- The embedded SmolLM2 in real servers without and with the cache: greedy replies are the same,
  alone, repeated and batched, and for a conversation's next turn; hits and tokens saved are
  counted; cancellation and deadlines still free slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import grpc
import pytest
import torch

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.config import load_model_specs
from server.domain import ModelKind
from server.engine.chat import ChatEngine
from server.engine.kv_slots import SlotBatch
from server.engine.prefix_cache import PrefixCache, block_keys
from server.settings import DEFAULT_CONFIG
from tests.conftest import engine_idle, make_settings, serving
from tests.integration.test_batching import PARAGRAPH, QUESTION, STORY, token_ids, until
from tests.tiny_models import tiny_llama

# -- the cache alone -------------------------------------------------------------------------------


def kv(values: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fake block of keys and values taking 8 * values bytes."""
    return [(torch.zeros(values), torch.zeros(values))]


def fill(cache: PrefixCache, prompt: Sequence[int], kv_values: int = 10) -> None:
    """Insert every block of `prompt`, as the scheduler does after each chunk."""
    parent = None
    for key, start, end in block_keys(prompt, cache.chunk):
        cache.insert(key, parent, prompt[start:end], kv(kv_values), torch.zeros(2))
        parent = key


def test_block_keys_chain_the_whole_prefix() -> None:
    a = block_keys(list(range(10)), 4)
    assert [(s, e) for _, s, e in a] == [(0, 4), (4, 8), (8, 10)]
    b = block_keys([*range(8), 99, 98], 4)
    assert [k for k, _, _ in a[:2]] == [k for k, _, _ in b[:2]]
    assert a[2][0] != b[2][0]
    # The same tokens after another first block are another block.
    c = block_keys([1, 0, 2, 3, *range(4, 10)], 4)
    assert all(x[0] != y[0] for x, y in zip(a, c, strict=True))


def test_lookup_finds_the_longest_cached_run() -> None:
    cache = PrefixCache(budget_bytes=1 << 20, chunk=4)
    prompt = list(range(10))
    assert cache.lookup(prompt) == []
    fill(cache, prompt)
    assert [len(b.tokens) for b in cache.lookup(prompt)] == [4, 4, 2]
    # A longer prompt shares the whole blocks, not the other prompt's short tail block.
    assert [len(b.tokens) for b in cache.lookup([*prompt, 10, 11])] == [4, 4]
    assert [len(b.tokens) for b in cache.lookup([0, 1, 2, 3, 7])] == [4]
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.tokens_saved) == (3, 1, 10 + 8 + 4)
    assert stats.blocks == 3


def test_a_block_needs_its_parent_and_eviction_keeps_the_budget() -> None:
    block = 8 * 10 + 8  # fake keys and values plus two float32 logits
    cache = PrefixCache(budget_bytes=5 * block, chunk=4)
    keys = block_keys(list(range(8)), 4)
    # A child whose parent is not cached could never be found: it is not stored.
    assert not cache.insert(keys[1][0], keys[0][0], [4, 5, 6, 7], kv(10), torch.zeros(2))
    fill(cache, list(range(12)))  # three blocks
    fill(cache, [50, 51, 52, 53, 54, 55, 56, 57])  # two more: the budget is full
    assert cache.stats.bytes == 5 * block
    cache.lookup(list(range(12)))  # the first prompt is now the most recently used
    fill(cache, [90, 91, 92, 93])
    assert cache.stats.bytes <= cache.budget_bytes
    # The least recently used leaf went (the second prompt's last block), its parent stayed.
    assert [len(b.tokens) for b in cache.lookup([50, 51, 52, 53, 54, 55, 56, 57])] == [4]
    assert len(cache.lookup(list(range(12)))) == 3
    assert len(cache.lookup([90, 91, 92, 93])) == 1
    # A block larger than the whole budget is never stored.
    assert not PrefixCache(budget_bytes=10, chunk=4).insert(b"k", None, [1], kv(10), torch.zeros(2))


# -- SlotBatch on a tiny model ---------------------------------------------------------------------


def chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def test_a_prompt_started_from_copied_blocks_gets_the_same_bits() -> None:
    batch = SlotBatch(tiny_llama(), torch.device("cpu"), max_sequences=4)
    size = 48
    first = token_ids(130, 1)  # three chunks: 48, 48, 34
    computed = [batch.prefill(0, c) for c in chunks(first, size)]
    blocks = [batch.copy_out(0, s, min(s + size, len(first))) for s in range(0, 130, size)]

    # The same prompt from all three blocks: no pass, and decoding goes on with the same bits.
    assert batch.copy_in(1, blocks) == 130
    # A longer prompt sharing the first two blocks computes only its own last chunk.
    second = [*first[:96], *token_ids(40, 5)]
    assert batch.copy_in(2, blocks[:2]) == 96
    restored_last = batch.prefill(2, second[96:])
    fresh = [batch.prefill(3, c) for c in chunks(second, size)]
    assert torch.equal(restored_last, fresh[-1])

    steps = [batch.decode({0: 7, 1: 7, 2: 9, 3: 9}) for _ in range(3)]
    for step in steps:
        assert torch.equal(step[0], step[1])
        assert torch.equal(step[2], step[3])
    assert computed[-1].shape == restored_last.shape
    with pytest.raises(ValueError, match="not empty"):
        batch.copy_in(1, blocks)


# -- the real model in real servers ----------------------------------------------------------------

MAX_TOKENS = 8
SYSTEM = f"You are a careful assistant. Use this background when it helps: {PARAGRAPH}"
PROMPTS = (QUESTION, f"Summarize this story in one sentence: {PARAGRAPH}", STORY)


def request(messages: Sequence[tuple[str, str]], **kwargs: object) -> pb.ChatRequest:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        **kwargs,  # type: ignore[arg-type]
    )


def user(content: str) -> pb.ChatRequest:
    return request([("user", content)])


async def text_of(stub: pb_grpc.GlmServiceStub, req: pb.ChatRequest) -> str:
    return "".join([c.choices[0].delta.content async for c in stub.Chat(req)])


@asynccontextmanager
async def served(prefix_cache_mb: int) -> AsyncIterator[tuple[pb_grpc.GlmServiceStub, ChatEngine]]:
    """The chat model alone, 4 sequences, 100-token steps (96-token prompt chunks)."""
    [chat] = [s for s in load_model_specs(DEFAULT_CONFIG) if s.kind is ModelKind.CHAT]
    spec = dataclasses.replace(
        chat, max_concurrent=4, max_batch_tokens=100, prefix_cache_mb=prefix_cache_mb
    )
    async with (
        serving(make_settings(), (spec,), grace=0.5) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield pb_grpc.GlmServiceStub(channel), app.registry.chat("")[1]


async def conversation(stub: pb_grpc.GlmServiceStub) -> list[str]:
    """Two turns after a long system prompt: the second prompt starts with the first's blocks."""
    first = [("system", SYSTEM), ("user", "Who climbs the stairs?")]
    answer = await text_of(stub, request(first))
    second = [*first, ("assistant", answer), ("user", "And how many steps are there?")]
    return [answer, await text_of(stub, request(second))]


@dataclasses.dataclass(frozen=True)
class Expected:
    replies: list[str]
    turns: list[str]


@pytest.fixture(scope="module")
async def expected() -> Expected:
    """The greedy replies of a server without the cache."""
    async with served(prefix_cache_mb=0) as (stub, engine):
        replies = [await text_of(stub, user(p)) for p in PROMPTS]
        turns = await conversation(stub)
        assert engine.counters.prefix_cache_hits == 0
    assert len(set(replies)) == len(PROMPTS)
    return Expected(replies, turns)


@pytest.fixture(scope="module")
async def cached() -> AsyncIterator[tuple[pb_grpc.GlmServiceStub, ChatEngine]]:
    async with served(prefix_cache_mb=64) as pair:
        yield pair


async def test_repeated_prompts_reuse_the_cache_and_reply_the_same(
    expected: Expected, cached: tuple[pb_grpc.GlmServiceStub, ChatEngine]
) -> None:
    stub, engine = cached
    assert [await text_of(stub, user(p)) for p in PROMPTS] == expected.replies
    before = engine.counters
    # Repeated alone: every prompt is found whole, no prefill pass runs.
    assert [await text_of(stub, user(p)) for p in PROMPTS] == expected.replies
    after = engine.counters
    assert after.prefix_cache_hits - before.prefix_cache_hits == len(PROMPTS)
    assert after.prefill_passes == before.prefill_passes
    # Repeated together, in one batch.
    together = await asyncio.gather(*(text_of(stub, user(p)) for p in PROMPTS))
    assert together == expected.replies


async def test_a_conversations_next_turn_reuses_the_first_turns_blocks(
    expected: Expected, cached: tuple[pb_grpc.GlmServiceStub, ChatEngine]
) -> None:
    stub, engine = cached
    before = engine.counters
    assert await conversation(stub) == expected.turns
    after = engine.counters
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 1
    assert after.prefix_cache_tokens - before.prefix_cache_tokens >= 96
    assert engine.stats.prefix_cache_tokens_saved == after.prefix_cache_tokens


async def test_cancellation_and_deadlines_free_slots_started_from_the_cache(
    cached: tuple[pb_grpc.GlmServiceStub, ChatEngine],
) -> None:
    stub, engine = cached
    long = request([("user", STORY)], max_tokens=500)
    await text_of(stub, request([("user", STORY)], max_tokens=1))  # now cached whole
    hits = engine.counters.prefix_cache_hits
    call = stub.Chat(long)
    await call.read()
    await call.read()
    assert engine.counters.prefix_cache_hits == hits + 1
    assert engine.stats.running == 1
    call.cancel()
    await until(lambda: engine.stats.running == 0, within_s=60)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Chat(long, timeout=1.0):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await engine_idle(engine, 60)
    assert engine.stats.running == 0
    assert engine.cache_bytes == 0
