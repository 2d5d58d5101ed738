"""ChatGLM3 checkpoints load into GlmForCausalLM with the same logits as the ChatGLM3 architecture.

The reference is a ChatGLM3 forward pass written here in plain torch from the architecture's
definition (RMSNorm, multi-query attention with key/value groups, rotary embedding on the first
half of each head rotating adjacent pairs, SwiGLU, pre-norm residuals, final norm, untied output
layer). It shares no code with the converter or transformers. Variants of it with one detail wrong
must NOT match, which shows the comparison is sensitive to each detail.

Also holds the builders of tiny checkpoints that the other ChatGLM3 tests import.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from server.config import ModelSpec
from server.domain import ModelKind
from server.models.sources import ModelLoadError

SP_VOCAB_SIZE = 400
# 400 pieces + 9 specials = 409 ids; the output layer is padded past them, as ChatGLM3's is.
PADDED_VOCAB_SIZE = 416
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "model_type": "chatglm",
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 96,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 64,
    "kv_channels": 16,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 4,
    "num_layers": 2,
    "original_rope": True,
    "padded_vocab_size": PADDED_VOCAB_SIZE,
    "post_layer_norm": True,
    "rmsnorm": True,
    "rope_ratio": 50,
    "seq_length": 512,
    "use_cache": True,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界。给你一个机会，你会想逃离你所在的虚拟世界吗？",
    "You are a helpful assistant.\nAnswer the following questions as best as you can.",
    'get_weather\n```python\ntool_call(location="Beijing", unit="celsius")\n```',
    '{\n    "name": "get_weather",\n    "description": "Get the weather",\n}',
    "What is the weather in Beijing today?",
]


def train_sentencepiece(vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """A small BPE SentencePiece model like ChatGLM3's: byte fallback, newlines kept, ids
    unk 0 / bos 1 / eos 2, a dummy-prefix "▁" before each encoded text."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def random_chatglm3_state(config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under ChatGLM3's own tensor names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    hidden, ffn = config["hidden_size"], config["ffn_hidden_size"]
    heads, d = config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    qkv_rows = heads * d + 2 * groups * d

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm() -> torch.Tensor:
        return 1.0 + rand(hidden, scale=0.1)

    state = {
        "transformer.embedding.word_embeddings.weight": rand(config["padded_vocab_size"], hidden),
        "transformer.rotary_pos_emb.inv_freq": torch.ones(d // 4),
        "transformer.encoder.final_layernorm.weight": norm(),
        "transformer.output_layer.weight": rand(config["padded_vocab_size"], hidden),
    }
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        state |= {
            p + "input_layernorm.weight": norm(),
            p + "self_attention.query_key_value.weight": rand(qkv_rows, hidden),
            p + "self_attention.query_key_value.bias": rand(qkv_rows, scale=0.1),
            p + "self_attention.dense.weight": rand(hidden, heads * d),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.dense_h_to_4h.weight": rand(2 * ffn, hidden),
            p + "mlp.dense_4h_to_h.weight": rand(hidden, ffn),
        }
    return state


def write_tiny_chatglm3(
    folder: Path,
    *,
    fmt: str = "safetensors",
    config_overrides: Mapping[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    tokenizer_model: bytes | None = None,
) -> dict[str, torch.Tensor]:
    """A ChatGLM3-layout checkpoint folder: config.json, tokenizer.model and weights as one
    model.safetensors ("safetensors") or two pytorch_model-*.bin shards with an index ("bin")."""
    from safetensors.torch import save_file

    config = {**TINY_CONFIG, **(config_overrides or {})}
    state = random_chatglm3_state(config) if state is None else state
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.model").write_bytes(tokenizer_model or train_sentencepiece())
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        names = sorted(state)
        shards = [names[: len(names) // 2], names[len(names) // 2 :]]
        weight_map = {}
        for n, shard in enumerate(shards, start=1):
            filename = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
            torch.save({k: state[k] for k in shard}, folder / filename)
            weight_map |= dict.fromkeys(shard, filename)
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return state


def chatglm3_spec(folder: Path, **overrides: Any) -> ModelSpec:
    """A chat ModelSpec for a tiny checkpoint on the CPU in float32."""
    values: dict[str, Any] = {
        "id": "tiny-chatglm3",
        "kind": ModelKind.CHAT,
        "path": folder,
        "device": "cpu",
        "dtype": "float32",
    }
    values.update(overrides)
    return ModelSpec(**values)


# --- the reference: ChatGLM3's forward pass from its definition -------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """Which details the reference gets right; every field but the defaults is a known mistake."""

    rope_base: float | None = None  # None: 10000 * rope_ratio
    adjacent_pairs: bool = True  # ChatGLM rotates (x[2i], x[2i+1]); False: (x[i], x[i + n/2])
    rotary_fraction: float = 0.5  # ChatGLM rotates the first half of each head
    repeat_groups: bool = True  # head h reads group h // (heads / groups); False: h % groups
    # How the fused query_key_value rows are read: None as the config says (multi-query: all q,
    # all k, all v; else head by head); "grouped" reads them as multi-query whatever it says.
    qkv_layout: str | None = None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate(x: torch.Tensor, angles: torch.Tensor, variant: Variant) -> torch.Tensor:
    """Rotary embedding on x (seq, heads, d) over its first angles.shape[-1] * 2 dims."""
    n = angles.shape[-1] * 2
    rot, rest = x[..., :n], x[..., n:]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    if variant.adjacent_pairs:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        a, b = rot[..., : n // 2], rot[..., n // 2 :]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


def reference_logits(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    ids: list[int],
    variant: Variant = Variant(),
) -> torch.Tensor:
    """Logits (seq, vocab) of ChatGLM3 for `ids`, in float64."""
    w = {k: v.double() for k, v in state.items()}
    heads, d = config["num_attention_heads"], config["kv_channels"]
    per_head = not config["multi_query_attention"] and variant.qkv_layout != "grouped"
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    eps = config["layernorm_epsilon"]
    seq = len(ids)
    rotary_dims = int(d * variant.rotary_fraction)
    base = variant.rope_base or 10000.0 * config["rope_ratio"]
    freqs = base ** (-torch.arange(0, rotary_dims, 2, dtype=torch.float64) / rotary_dims)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None, :]
    causal = torch.full((seq, seq), -math.inf, dtype=torch.float64).triu(1)

    h = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
        qkv = x @ w[p + "self_attention.query_key_value.weight"].T
        qkv = qkv + w[p + "self_attention.query_key_value.bias"]
        if per_head:
            # ChatGLM without multi-query attention: each head's q, k and v rows side by side.
            q, k, v = qkv.reshape(seq, heads, 3 * d).split(d, dim=-1)
        else:
            q = qkv[:, : heads * d].reshape(seq, heads, d)
            k = qkv[:, heads * d : (heads + groups) * d].reshape(seq, groups, d)
            v = qkv[:, (heads + groups) * d :].reshape(seq, groups, d)
        q, k = _rotate(q, angles, variant), _rotate(k, angles, variant)
        per_group = heads // groups
        if variant.repeat_groups:
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        else:
            k, v = k.repeat(1, per_group, 1), v.repeat(1, per_group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + causal
        context = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, heads * d)
        h = h + context @ w[p + "self_attention.dense.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = (x @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    h = _rms_norm(h, w["transformer.encoder.final_layernorm.weight"], eps)
    return h @ w["transformer.output_layer.weight"].T


# --- tests ---------------------------------------------------------------------------------------

IDS = [401, 403, 406, 5, 77, 123, 9, 250, 300, 12, 399, 407, 33, 64, 128, 200, 2, 18, 405, 90]


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    return train_sentencepiece()


def load_converted(folder: Path, cache: Path) -> Any:
    from transformers import GlmForCausalLM

    from server.models.chatglm3.weights import converted_chatglm3

    converted = converted_chatglm3(chatglm3_spec(folder), folder, cache)
    return GlmForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


# ChatGLM's other attention layout: no multi-query groups, the fused rows head by head.
PER_HEAD_CONFIG = {**TINY_CONFIG, "multi_query_attention": False}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize(
    "config", [TINY_CONFIG, PER_HEAD_CONFIG], ids=["multi_query", "per_head_qkv"]
)
def test_logits_match_the_reference(
    fmt: str, config: dict[str, Any], tmp_path: Path, sp_model: bytes
) -> None:
    overrides = {"multi_query_attention": config["multi_query_attention"]}
    state = write_tiny_chatglm3(
        tmp_path / "ckpt", fmt=fmt, tokenizer_model=sp_model, config_overrides=overrides
    )
    model = load_converted(tmp_path / "ckpt", tmp_path / "cache")
    heads, groups = config["num_attention_heads"], config["multi_query_group_num"]
    assert model.config.num_key_value_heads == (
        groups if config["multi_query_attention"] else heads
    )
    with torch.no_grad():
        got = model(input_ids=torch.tensor([IDS])).logits[0].double()
    expected = reference_logits(state, config, IDS)
    assert got.shape == (len(IDS), PADDED_VOCAB_SIZE)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Not trivially equal: the logits vary over positions and vocabulary.
    assert expected.std() > 0.5


def test_per_head_rows_read_as_multi_query_do_not_match(tmp_path: Path, sp_model: bytes) -> None:
    """Reading a per-head checkpoint's fused rows as [all q; all k; all v] (what the converter
    once did for every checkpoint) gives other logits: the comparison above can tell."""
    state = write_tiny_chatglm3(
        tmp_path / "ckpt",
        tokenizer_model=sp_model,
        config_overrides={"multi_query_attention": False},
    )
    model = load_converted(tmp_path / "ckpt", tmp_path / "cache")
    with torch.no_grad():
        got = model(input_ids=torch.tensor([IDS])).logits[0].double()
    wrong = reference_logits(state, PER_HEAD_CONFIG, IDS, Variant(qkv_layout="grouped"))
    assert (got - wrong).abs().max() > 1e-2


@pytest.mark.parametrize(
    "variant",
    [
        Variant(rope_base=10000.0),  # rope_ratio ignored (the upstream conversion script's bug)
        Variant(adjacent_pairs=False),  # Llama/NeoX rotate-half pairing
        Variant(rotary_fraction=1.0),  # rotary on the whole head
        Variant(repeat_groups=False),  # heads assigned to key/value groups round-robin
    ],
    ids=["rope_ratio_ignored", "rotate_half_pairs", "full_rotary", "wrong_groups"],
)
def test_a_wrong_detail_fails_the_comparison(
    variant: Variant, tmp_path: Path, sp_model: bytes
) -> None:
    state = write_tiny_chatglm3(tmp_path / "ckpt", tokenizer_model=sp_model)
    model = load_converted(tmp_path / "ckpt", tmp_path / "cache")
    with torch.no_grad():
        got = model(input_ids=torch.tensor([IDS])).logits[0].double()
    wrong = reference_logits(state, TINY_CONFIG, IDS, variant)
    assert (got - wrong).abs().max() > 1e-2


def test_a_model_built_with_rope_ratio_ignored_does_not_match(
    tmp_path: Path, sp_model: bytes
) -> None:
    from transformers import GlmForCausalLM

    from server.models.chatglm3.weights import glm_config_from_chatglm, read_chatglm_config

    state = write_tiny_chatglm3(tmp_path / "ckpt", tokenizer_model=sp_model)
    right = load_converted(tmp_path / "ckpt", tmp_path / "cache")
    config = glm_config_from_chatglm(read_chatglm_config(tmp_path / "ckpt"))
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    config.rope_parameters["rope_theta"] = 10000.0
    wrong = GlmForCausalLM(config).eval()
    wrong.load_state_dict(right.state_dict())
    expected = reference_logits(state, TINY_CONFIG, IDS)
    with torch.no_grad():
        got = wrong(input_ids=torch.tensor([IDS])).logits[0].double()
    assert (got - expected).abs().max() > 1e-2


@pytest.mark.parametrize(
    "config", [TINY_CONFIG, PER_HEAD_CONFIG], ids=["multi_query", "per_head_qkv"]
)
def test_served_forward_with_kv_cache_matches_the_reference(
    config: dict[str, Any], tmp_path: Path, sp_model: bytes
) -> None:
    from server.models.chatglm3.model import ChatGLM3Model

    overrides = {"multi_query_attention": config["multi_query_attention"]}
    state = write_tiny_chatglm3(
        tmp_path / "ckpt", tokenizer_model=sp_model, config_overrides=overrides
    )
    model = ChatGLM3Model(chatglm3_spec(tmp_path / "ckpt"), tmp_path / "cache")
    expected = reference_logits(state, config, IDS)
    logits, cache = model.forward(IDS[:12], None)
    torch.testing.assert_close(logits.double(), expected[11], atol=1e-4, rtol=0)
    for position in range(12, len(IDS)):
        logits, cache = model.forward([IDS[position]], cache)
        torch.testing.assert_close(logits.double(), expected[position], atol=1e-4, rtol=0)
    assert model.context_length == 512
    assert model.max_input_tokens == 512


def test_bfloat16_on_cpu_loads_and_float16_is_refused(tmp_path: Path, sp_model: bytes) -> None:
    from server.models.chatglm3.model import ChatGLM3Model

    write_tiny_chatglm3(tmp_path / "ckpt", tokenizer_model=sp_model)
    model = ChatGLM3Model(chatglm3_spec(tmp_path / "ckpt", dtype="bfloat16"), tmp_path / "cache")
    logits, _ = model.forward(IDS, None)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    with pytest.raises(ModelLoadError, match="float16 is not supported on CPU"):
        ChatGLM3Model(chatglm3_spec(tmp_path / "ckpt", dtype="float16"), tmp_path / "cache")


def test_conversion_is_cached_and_redone_when_weights_change(
    tmp_path: Path, sp_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.models.chatglm3 import weights as chatglm3_weights

    folder = tmp_path / "ckpt"
    write_tiny_chatglm3(folder, tokenizer_model=sp_model)
    spec = chatglm3_spec(folder)
    first = chatglm3_weights.converted_chatglm3(spec, folder, tmp_path / "cache")
    assert json.loads((first / "config.json").read_text())["model_type"] == "glm"

    def fail(*_: object) -> None:
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(chatglm3_weights, "convert_checkpoint", fail)
    assert chatglm3_weights.converted_chatglm3(spec, folder, tmp_path / "cache") == first
    monkeypatch.undo()

    weights = folder / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 10))
    second = chatglm3_weights.converted_chatglm3(spec, folder, tmp_path / "cache")
    assert second != first
    assert (second / "config.json").is_file()
    # No staging folder is left behind (the conversions' lock files stay, empty).
    converted = (tmp_path / "cache" / "converted").iterdir()
    assert not [p for p in converted if p.name.startswith(".") and p.suffix != ".lock"]


def test_pickled_code_in_a_bin_shard_is_refused_not_run(tmp_path: Path, sp_model: bytes) -> None:
    from server.models.chatglm3.weights import converted_chatglm3

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    folder = tmp_path / "ckpt"
    state = write_tiny_chatglm3(folder, fmt="bin", tokenizer_model=sp_model)
    shard = folder / "pytorch_model-00001-of-00002.bin"
    poisoned = dict(torch.load(shard, weights_only=True))
    poisoned["transformer.embedding.word_embeddings.weight"] = Payload()  # type: ignore[assignment]
    torch.save(poisoned, shard)
    assert state
    with pytest.raises(ModelLoadError, match="weights only"):
        converted_chatglm3(chatglm3_spec(folder), folder, tmp_path / "cache")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rmsnorm": False}, "rmsnorm=False"),
        ({"add_bias_linear": True}, "add_bias_linear=True"),
        ({"pre_seq_len": 128}, "pre_seq_len=128"),
        ({"model_type": "llama"}, "not 'chatglm'"),
        ({"multi_query_group_num": 3}, "do not split"),
    ],
)
def test_unsupported_configs_are_refused_clearly(
    change: dict[str, Any], message: str, tmp_path: Path, sp_model: bytes
) -> None:
    from server.models.chatglm3.weights import converted_chatglm3

    folder = tmp_path / "ckpt"
    write_tiny_chatglm3(folder, tokenizer_model=sp_model)
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, **change}))
    with pytest.raises(ModelLoadError, match=message):
        converted_chatglm3(chatglm3_spec(folder), folder, tmp_path / "cache")


def test_missing_extra_and_misshapen_tensors_are_refused(tmp_path: Path, sp_model: bytes) -> None:
    from server.models.chatglm3.weights import converted_chatglm3

    state = random_chatglm3_state(TINY_CONFIG)
    cases: list[tuple[dict[str, torch.Tensor], str]] = [
        ({k: v for k, v in state.items() if "layers.1.mlp" not in k}, "lacks 2 tensors"),
        ({**state, "transformer.prefix_encoder.embedding.weight": torch.zeros(2)}, "unexpected"),
        (
            {**state, "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight": torch.zeros(64, 8)},
            "has shape",
        ),
    ]
    for n, (broken, message) in enumerate(cases):
        folder = tmp_path / f"ckpt{n}"
        write_tiny_chatglm3(folder, state=broken, tokenizer_model=sp_model)
        with pytest.raises(ModelLoadError, match=message):
            converted_chatglm3(chatglm3_spec(folder), folder, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "converted").iterdir() if p.suffix != ".lock"]


def test_no_weights_and_a_non_sentencepiece_tokenizer_are_refused(tmp_path: Path) -> None:
    from server.models.chatglm3.model import ChatGLM3Model

    folder = tmp_path / "ckpt"
    write_tiny_chatglm3(folder, tokenizer_model=b"not a sentencepiece model")
    with pytest.raises(ModelLoadError, match="not a SentencePiece model"):
        ChatGLM3Model(chatglm3_spec(folder), tmp_path / "cache")
    (folder / "model.safetensors").unlink()
    from server.models.chatglm3.weights import checkpoint_files

    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        checkpoint_files(folder)
