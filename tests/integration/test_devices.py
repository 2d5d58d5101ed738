"""What the chat engine does per device and dtype: half precision that serves, float16 attention
that stays finite, placement over several GPUs, key/value memory from the device's free memory.

Each test runs on the CPU here; the `gpu` cases run with `pytest -m gpu` on a CUDA machine and
are skipped, with the reason printed, elsewhere (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import torch.nn.functional as F

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.app import GlmApp
from server.engine import kv_slots
from server.engine.chat import ChatEngine
from server.engine.device_profile import CPU, CUDA, available_bytes, profile_for
from server.engine.kv_slots import KVMemoryError, KVSlotCache, SlotBatch, _attention
from server.errors import ResourceExhaustedError
from server.models.chatglm3.model import one_gpu_for
from tests.conftest import make_settings
from tests.devices import gpu_param, needs_gpus
from tests.integration.test_batching import full_forward_logits, token_ids
from tests.integration.test_chatglm3_weights import (
    chatglm3_spec,
    train_sentencepiece,
    write_tiny_chatglm3,
)
from tests.tiny_models import tiny_llama

# -- half precision serves -------------------------------------------------------------------------

QUESTIONS = [
    "Hello",
    "What is the weather in Beijing today?",
    "一二三四五六七八九十",
    "quick brown fox",
]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("cpu", "bfloat16"), id="cpu-bfloat16"),
        gpu_param(("cuda", "float16"), id="cuda-float16"),
        gpu_param(("cuda", "bfloat16"), id="cuda-bfloat16"),
    ],
)
async def half_app(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GlmApp]:
    """A server of a tiny ChatGLM3 checkpoint in half precision on the case's device."""
    device, dtype = request.param
    root = tmp_path_factory.mktemp(f"half-{device}-{dtype}")
    write_tiny_chatglm3(root / "ckpt", tokenizer_model=train_sentencepiece())
    spec = chatglm3_spec(root / "ckpt", device=device, dtype=dtype, max_concurrent=4)
    app = GlmApp(make_settings(cache_dir=root / "cache"), specs=(spec,))
    await app.start()
    try:
        await app.load_models()
        yield app
    finally:
        await app.stop(grace=1)


async def test_a_half_precision_chat_model_serves_greedy_replies_batched_as_alone(
    half_app: GlmApp,
) -> None:
    """The slot batch opens in half precision, and batching changes no greedy reply."""
    model_id, engine = half_app.registry.chat("")
    assert isinstance(engine, ChatEngine)
    assert isinstance(engine.batch, SlotBatch)
    spec = half_app.registry.spec(model_id)
    assert engine.max_batch_tokens == profile_for(torch.device(spec.device)).chat_step_tokens

    async with grpc.aio.insecure_channel(f"127.0.0.1:{half_app.port}") as channel:
        stub = pb_grpc.GlmServiceStub(channel)

        async def reply(question: str) -> tuple[str, int]:
            request = pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content=question)],
                temperature=0.0,
                max_tokens=12,
            )
            chunks = [c async for c in stub.Chat(request)]
            text = "".join(c.choices[0].delta.content for c in chunks)
            return text, chunks[-1].usage.completion_tokens

        alone = [await reply(q) for q in QUESTIONS]
        before = engine.counters
        together = await asyncio.gather(*(reply(q) for q in QUESTIONS))
        after = engine.counters
    assert together == alone
    assert all(tokens > 0 for _, tokens in alone)
    # The sequences shared decode passes.
    assert after.decode_passes - before.decode_passes < after.decode_tokens - before.decode_tokens


# -- float16 decode attention ----------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", gpu_param("cuda", id="cuda")])
def test_float16_decode_attention_stays_finite_where_sdpa_does(device: str) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, kv_len = 3, 4, 2, 64, 64
    # Activations this large make raw q·k pass float16's largest value, 65504.
    q = torch.randn(batch, heads, 1, dim, generator=generator) * 50
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=generator) * 50
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=generator)
    # A key equal to a head's query: a large positive score, the one that wins the softmax.
    groups = heads // kv_heads
    k[:, :, 3] = q[:, ::groups, 0]
    visible = torch.arange(kv_len)[None, :] < torch.tensor([kv_len, 40, 9])[:, None]
    mask = torch.zeros(batch, 1, 1, kv_len).masked_fill(~visible[:, None, None, :], -65504.0)
    q16, k16, v16, mask16 = (t.to(device, torch.float16) for t in (q, k, v, mask))
    unscaled = torch.matmul(q16, k16.repeat_interleave(groups, 1).transpose(2, 3))
    assert (unscaled == float("inf")).any()  # the product scaled afterwards would overflow

    out, _ = _attention(torch.nn.Module(), q16, k16, v16, mask16, kv_slots_decode=True)
    sdpa = F.scaled_dot_product_attention(q16, k16, v16, attn_mask=mask16, enable_gqa=True)
    assert torch.isfinite(sdpa).all()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), sdpa.transpose(1, 2).float(), atol=2e-2, rtol=0)


# -- several GPUs ----------------------------------------------------------------------------------


def _two_gpu_map(lm: torch.nn.Module) -> dict[str, Any]:
    """accelerate's own placement of `lm` over two GPUs, the first too small for all of it: the
    embeddings and the first layer there, the rest on the second."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(lm)
    first = sizes["model.embed_tokens"] + 2 * sizes["model.layers.0"]
    return dict(
        infer_auto_device_map(
            lm,
            max_memory={0: first, 1: 2 * sizes[""]},
            no_split_module_classes=lm._no_split_modules,
        )
    )


def test_kept_logits_positions_go_where_the_last_hidden_states_are() -> None:
    """Split over two GPUs, transformers picks the kept logits' positions out of hidden states
    on the last GPU: the index must be made there, and each layer's memory on its own GPU."""
    lm = tiny_llama()
    device_map = _two_gpu_map(lm)
    assert device_map["model.embed_tokens"] == device_map["model.layers.0"] == 0
    assert device_map["model.layers.1"] == device_map["model.norm"] == 1
    lm.hf_device_map = device_map  # what from_pretrained(device_map=...) records
    batch = SlotBatch(lm, torch.device("cuda", 0), max_sequences=4, profile=CPU)
    assert batch.hidden_states_device == torch.device("cuda", 1)
    assert batch.cache.layers_on == {torch.device("cuda", 0): 1, torch.device("cuda", 1): 1}
    # Unsplit, everything stays on the model's device.
    plain = SlotBatch(tiny_llama(), torch.device("cpu"), max_sequences=4)
    assert plain.hidden_states_device == torch.device("cpu")
    assert plain.cache.layers_on == {torch.device("cpu"): 2}


@pytest.mark.gpu
def test_a_model_split_over_two_gpus_shares_prefill_passes_and_decodes() -> None:
    needs_gpus(2)
    from accelerate import dispatch_model

    lm = tiny_llama()
    reference = copy.deepcopy(lm).to("cuda:0")
    lm = dispatch_model(lm, device_map=_two_gpu_map(lm))
    batch = SlotBatch(lm, torch.device("cuda", 0), max_sequences=4, max_pass_tokens=256)
    assert batch.hidden_states_device == torch.device("cuda", 1)
    shared = batch.shared_prefill_min_tokens
    if shared is None:
        pytest.skip("no pass size gives a row the same bits on this GPU: chunks run alone")
    prompts = {0: token_ids(max(shared, 20), 1), 1: token_ids(max(shared, 33), 2)}
    first = batch.prefill_shared(list(prompts.items()))
    for ids, logits in zip(prompts.values(), first, strict=True):
        torch.testing.assert_close(
            logits, full_forward_logits(reference, ids), atol=1e-3, rtol=1e-3
        )
        ids.append(int(logits.argmax()))
    nxt = batch.decode({slot: ids[-1] for slot, ids in prompts.items()})
    for slot, ids in prompts.items():
        torch.testing.assert_close(
            nxt[slot], full_forward_logits(reference, ids), atol=1e-3, rtol=1e-3
        )


def test_a_model_that_fits_one_gpu_goes_whole_onto_the_freest_one() -> None:
    gib = 1 << 30
    assert one_gpu_for(13 * gib, [80 * gib, 80 * gib]) == 0
    assert one_gpu_for(13 * gib, [10 * gib, 20 * gib]) == 1
    assert one_gpu_for(13 * gib, [14 * gib, 14 * gib]) is None  # no room left for its cache
    assert one_gpu_for(60 * gib, [40 * gib, 40 * gib]) is None
    assert one_gpu_for(1, []) is None


# -- key/value memory ------------------------------------------------------------------------------


def test_a_checked_cache_grows_twofold_while_it_fits_and_refuses_what_does_not() -> None:
    cpu = torch.device("cpu")
    free = {"bytes": 1 << 30}
    cache = KVSlotCache(
        2,
        checked=True,
        position_bytes=64,
        layer_devices=[cpu, cpu],
        free_memory=lambda device: free["bytes"],
    )
    cache.reserve(2, 100)
    assert cache.capacity == (2, 256)
    cache.reserve(2, 300)
    assert cache.capacity == (2, 512)
    cache.reserve(3, 600)
    assert cache.capacity == (3, 1024)  # twice what it had, more than the 768 asked for
    # Twofold (2048) would take 589824 more bytes, the 1280 needed 294912: room for the latter.
    free["bytes"] = 360_000
    cache.reserve(3, 1100)
    assert cache.capacity == (3, 1280)
    with pytest.raises(KVMemoryError, match="GiB available") as refused:
        cache.reserve(3, 5000)
    assert isinstance(refused.value, ResourceExhaustedError)
    assert cache.capacity == (3, 1280)
    # An unchecked cache (a CPU) grows by fixed steps, with no question asked.
    plain = KVSlotCache(2, position_bytes=64, layer_devices=[cpu, cpu])
    plain.reserve(3, 600)
    assert plain.capacity == (3, 768)


def test_a_slot_batch_refuses_a_prompt_its_device_has_no_memory_for_and_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2 layers of 2 key/value heads of 16 floats: 256 bytes a position per layer.
    monkeypatch.setattr(kv_slots, "available_bytes", lambda device: 200_000)
    batch = SlotBatch(tiny_llama(), torch.device("cpu"), max_sequences=2, profile=CUDA)
    first = batch.prefill(0, token_ids(10, 1))  # 256 positions: 131072 bytes, which fit
    with pytest.raises(KVMemoryError):
        batch.prefill(0, token_ids(300, 2))  # 512 positions would need 196608 more
    nxt = batch.decode({0: int(first.argmax())})
    assert torch.isfinite(nxt[0]).all()


@pytest.mark.gpu
def test_the_kv_budget_comes_from_free_gpu_memory() -> None:
    device = torch.device("cuda", 0)
    free, _ = torch.cuda.mem_get_info(device)
    available = available_bytes(device)
    assert available is not None
    assert available >= free
    batch = SlotBatch(tiny_llama().to(device), device, max_sequences=4)
    assert batch.profile is CUDA
    # Far more than the GPU holds: a clear error before any allocation, not an OOM mid-pass.
    with pytest.raises(KVMemoryError):
        batch.cache.reserve(4, 1 << 34)
    assert batch.cache.capacity == (0, 0)


def test_step_budgets_are_chosen_per_device(tmp_path: Path) -> None:
    assert profile_for(torch.device("cpu")) is CPU
    assert profile_for(torch.device("cuda", 1)) is CUDA
    assert CUDA.chat_step_tokens > CPU.chat_step_tokens
    assert CPU.masked_prefill
    assert not CUDA.masked_prefill
