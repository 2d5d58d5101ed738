"""ChatGLM3 checkpoints as transformers' native GlmForCausalLM, without trust_remote_code.

ChatGLM3 and transformers' Glm are the same network; only names and one fused tensor differ:

| ChatGLM3 (config.json / state dict)          | GlmConfig / GlmForCausalLM                  |
|----------------------------------------------|---------------------------------------------|
| num_layers                                   | num_hidden_layers                           |
| ffn_hidden_size                              | intermediate_size                           |
| padded_vocab_size                            | vocab_size                                  |
| kv_channels                                  | head_dim                                    |
| multi_query_group_num (multi_query_attention)| num_key_value_heads                         |
| layernorm_epsilon (RMSNorm)                  | rms_norm_eps                                |
| seq_length                                   | max_position_embeddings                     |
| rope_ratio: base 10000 * rope_ratio          | rope_theta = 10000 * rope_ratio             |
| rotary on kv_channels // 2 dims of each head | partial_rotary_factor = 0.5                 |
| add_qkv_bias                                 | attention_bias (q/k/v only, as in ChatGLM)  |
| self_attention.query_key_value               | q_proj / k_proj / v_proj (see below)        |
| self_attention.dense                         | self_attn.o_proj                            |
| mlp.dense_h_to_4h ([gate; up], SwiGLU)       | mlp.gate_up_proj (same layout)              |
| mlp.dense_4h_to_h                            | mlp.down_proj                               |
| embedding.word_embeddings / output_layer     | embed_tokens / lm_head (untied)             |

The fused query_key_value rows come in one of two layouts, as ChatGLM's own attention reads them:
with multi_query_attention (every released ChatGLM2/3 checkpoint) all query heads, then the key
groups, then the value groups; without it, head by head, each head's query, key and value rows
together ([q0; k0; v0; q1; k1; v1; ...]), every head its own key/value group.

Both rotate interleaved pairs (x[2i], x[2i+1]) of the rotary part by frequency i, so the q and k
rows need no permutation (unlike Llama conversions, which switch to the rotate-half layout).

The conversion runs once per checkpoint and is cached as safetensors under the cache dir, so later
starts memory-map it, and accelerate's device_map="auto" can split it over several GPUs through
transformers' ordinary from_pretrained. Nothing from the checkpoint is ever executed: .bin shards
are read with torch.load(weights_only=True), which refuses pickled code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from server.config import ModelSpec
from server.models.sources import ModelLoadError, convert_once, resolve_source

log = logging.getLogger(__name__)

__all__ = [
    "CONVERTER_VERSION",
    "checkpoint_files",
    "convert_checkpoint",
    "converted_chatglm3",
    "expected_shapes",
    "glm_config_from_chatglm",
    "is_chatglm3",
    "local_checkpoint",
    "map_tensor",
    "read_chatglm_config",
]

# Bump when the converted output changes, so that stale caches are not reused.
CONVERTER_VERSION = "2"

# ChatGLMConfig's defaults, for keys a config.json leaves out.
_DEFAULTS: dict[str, Any] = {
    "kv_channels": None,
    "seq_length": 2048,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "multi_query_attention": False,
    "multi_query_group_num": 1,
    "rope_ratio": 1.0,
    "original_rope": True,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
_REQUIRED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
# Variants of the architecture GlmForCausalLM does not have, as (key, the value Glm matches).
_SUPPORTED_VALUES = (
    ("rmsnorm", True),
    ("apply_residual_connection_post_layernorm", False),
    ("post_layer_norm", True),
    ("add_bias_linear", False),
    ("original_rope", True),
    ("quantization_bit", 0),
    ("pre_seq_len", None),
)

_TOP_LEVEL = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_PER_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_LAYER_KEY = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_QKV_KEY = re.compile(r"self_attention\.query_key_value\.(weight|bias)")
# Buffers the original code saved that the native model recomputes.
_IGNORED = frozenset({"transformer.rotary_pos_emb.inv_freq"})


def read_chatglm_config(folder: Path) -> dict[str, Any]:
    """config.json of a ChatGLM checkpoint, with ChatGLMConfig's defaults filled in and checked."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found: not a ChatGLM3 checkpoint folder") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if raw.get("model_type") != "chatglm":
        raise ModelLoadError(f"{path}: model_type is {raw.get('model_type')!r}, not 'chatglm'")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing or ("padded_vocab_size" not in raw and "vocab_size" not in raw):
        raise ModelLoadError(f"{path}: missing ChatGLM fields {missing or ['padded_vocab_size']}")
    config = {**_DEFAULTS, **raw}
    for key, supported in _SUPPORTED_VALUES:
        if config[key] != supported:
            raise ModelLoadError(
                f"{path}: {key}={config[key]!r} is a ChatGLM variant this server does not load "
                f"(it needs {key}={supported!r})"
            )
    return config


def glm_config_from_chatglm(config: Mapping[str, Any]) -> Any:
    """The GlmConfig of the same network (see the table in the module docstring)."""
    from transformers import GlmConfig

    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config["kv_channels"] or hidden // heads)
    groups = int(config["multi_query_group_num"]) if config["multi_query_attention"] else heads
    if heads % groups:
        raise ModelLoadError(f"{heads} attention heads do not split into {groups} key/value groups")
    return GlmConfig(
        vocab_size=int(config.get("padded_vocab_size") or config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["ffn_hidden_size"]),
        num_hidden_layers=int(config["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,
        hidden_act="silu",
        attention_dropout=0.0,
        max_position_embeddings=int(config["seq_length"]),
        rms_norm_eps=float(config["layernorm_epsilon"]),
        # ChatGLM scales its rotary base by rope_ratio (50 for the 32k model). Reading rope_ratio
        # wrongly leaves the base at 10000 and silently degrades every position after the first.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * float(config["rope_ratio"]),
            "partial_rotary_factor": 0.5,
        },
        attention_bias=bool(config["add_qkv_bias"]),
        tie_word_embeddings=False,
        pad_token_id=int(config["pad_token_id"]),
        eos_token_id=int(config["eos_token_id"]) if config["eos_token_id"] is not None else None,
        bos_token_id=None,
        use_cache=True,
    )


def expected_shapes(glm: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor GlmForCausalLM loads for `glm` (a GlmConfig), with its shape."""
    hidden, ffn, vocab = glm.hidden_size, glm.intermediate_size, glm.vocab_size
    q_rows = glm.num_attention_heads * glm.head_dim
    kv_rows = glm.num_key_value_heads * glm.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(glm.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "mlp.gate_up_proj.weight": (2 * ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        }
        if glm.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_rows,),
                p + "self_attn.k_proj.bias": (kv_rows,),
                p + "self_attn.v_proj.bias": (kv_rows,),
            }
    return shapes


def map_tensor(
    name: str, tensor: torch.Tensor, glm: Any, *, per_head_qkv: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """One ChatGLM3 tensor as the GlmForCausalLM tensors it becomes (none for ignored buffers).

    `per_head_qkv`: the fused query_key_value rows are laid out head by head (a checkpoint with
    multi_query_attention false; see the module docstring).
    """
    if name in _IGNORED:
        return []
    if name in _TOP_LEVEL:
        return [(_TOP_LEVEL[name], tensor)]
    layer = _LAYER_KEY.fullmatch(name)
    if layer is None:
        raise ModelLoadError(f"unexpected tensor {name!r} in the ChatGLM3 checkpoint")
    prefix, rest = f"model.layers.{layer.group(1)}.", layer.group(2)
    if rest in _PER_LAYER:
        return [(prefix + _PER_LAYER[rest], tensor)]
    qkv = _QKV_KEY.fullmatch(rest)
    if qkv is None:
        raise ModelLoadError(f"unexpected tensor {name!r} in the ChatGLM3 checkpoint")
    # Each part is cloned: safetensors refuses tensors that share one storage.
    q_rows = glm.num_attention_heads * glm.head_dim
    kv_rows = glm.num_key_value_heads * glm.head_dim
    if tensor.shape[0] != q_rows + 2 * kv_rows:
        raise ModelLoadError(
            f"{name} has {tensor.shape[0]} rows; the config implies {q_rows + 2 * kv_rows}"
        )
    if per_head_qkv:
        # Rows [q0; k0; v0; q1; ...]: one (query, key, value) block of head_dim rows per head.
        heads = tensor.reshape(glm.num_attention_heads, 3, glm.head_dim, *tensor.shape[1:])
        q, k, v = (heads[:, part].reshape(q_rows, *tensor.shape[1:]) for part in range(3))
    else:
        # All query heads, then the key groups, then the value groups.
        q, k, v = torch.split(tensor, [q_rows, kv_rows, kv_rows], dim=0)
    kind = qkv.group(1)
    return [
        (f"{prefix}self_attn.{proj}_proj.{kind}", part.clone())
        for proj, part in (("q", q), ("k", k), ("v", v))
    ]


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint: safetensors when present, else pytorch_model*.bin."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({folder / str(f) for f in weight_map.values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ModelLoadError(f"{index} names missing weight files {absent}")
            return files
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise ModelLoadError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weight file, by name."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, handle.get_tensor(name)
        return
    try:
        # weights_only: only tensors and plain containers unpickle; any code in the file is refused.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} could not be read as weights only: {exc}") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"{path}: entry {name!r} is not a tensor")
        yield str(name), tensor


def convert_checkpoint(folder: Path, target: Path) -> None:
    """Write `folder` (a ChatGLM3 checkpoint) into `target` as a GlmForCausalLM checkpoint.

    One output shard per input shard keeps memory at about one shard's size.
    """
    from safetensors.torch import save_file

    config = read_chatglm_config(folder)
    glm = glm_config_from_chatglm(config)
    per_head_qkv = not config["multi_query_attention"]
    shapes = expected_shapes(glm)
    files = checkpoint_files(folder)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    target.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(files, start=1):
        shard_name = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        shard: dict[str, torch.Tensor] = {}
        for name, tensor in _read_tensors(path):
            for new_name, new_tensor in map_tensor(name, tensor, glm, per_head_qkv=per_head_qkv):
                if new_name not in shapes:
                    raise ModelLoadError(f"{path.name}: {name} maps to no tensor of the model")
                if new_name in weight_map or new_name in shard:
                    raise ModelLoadError(f"{path.name}: {name} appears twice in the checkpoint")
                if tuple(new_tensor.shape) != shapes[new_name]:
                    raise ModelLoadError(
                        f"{path.name}: {name} has shape {tuple(new_tensor.shape)}; the config "
                        f"implies {shapes[new_name]} for {new_name}"
                    )
                shard[new_name] = new_tensor.contiguous()
        save_file(shard, str(target / shard_name), metadata={"format": "pt"})
        for new_name, new_tensor in shard.items():
            weight_map[new_name] = shard_name
            total_bytes += new_tensor.numel() * new_tensor.element_size()
        del shard
    missing = sorted(set(shapes) - set(weight_map))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"the checkpoint in {folder} lacks {len(missing)} tensors: {shown}")
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    glm.save_pretrained(str(target))


def _cache_key(folder: Path) -> str:
    """Changes when the checkpoint's config or any weight file changes, or the converter does."""
    parts = [CONVERTER_VERSION, str(folder.resolve()), (folder / "config.json").read_text("utf-8")]
    for path in checkpoint_files(folder):
        stat = path.stat()
        parts += [path.name, str(stat.st_size), str(int(stat.st_mtime))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def converted_chatglm3(spec: ModelSpec, folder: Path, cache_dir: Path) -> Path:
    """A GlmForCausalLM folder converted from the ChatGLM3 checkpoint in `folder`, made once.

    Written under a temporary name and renamed, so a concurrent start never sees half a cache.
    """
    target = cache_dir / "converted" / f"{spec.id}-chatglm3-{_cache_key(folder)}"

    def write(staging: Path) -> None:
        log.info("converting the ChatGLM3 checkpoint %s to %s (once)", folder, target)
        started = time.monotonic()
        convert_checkpoint(folder, staging)
        log.info("converted %s in %.1f s", spec.id, time.monotonic() - started)

    return convert_once(target, write)


def local_checkpoint(spec: ModelSpec) -> Path:
    """The checkpoint's folder: the spec's local path, else a download of the Hub id's files.

    Only config, tokenizer and weight files are fetched (never the repository's Python code), and
    only one weight format: safetensors when the repository has them, else the .bin shards.
    """
    source = resolve_source(spec)
    if source != spec.hub_id:
        return Path(source)
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(source)
    weights = (
        "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
    )
    return Path(snapshot_download(source, allow_patterns=["*.json", "tokenizer.model", weights]))


def is_chatglm3(spec: ModelSpec) -> bool:
    """Whether `spec` names a ChatGLM3 checkpoint: family = "chatglm3", or a local folder whose
    config.json says model_type "chatglm"."""
    if spec.family is not None:
        return spec.family == "chatglm3"
    try:
        source = resolve_source(spec)
    except ModelLoadError:
        return False
    if source == spec.hub_id:
        return False  # not inspected without a download; set family = "chatglm3" for Hub ids
    config = Path(source) / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("model_type") == "chatglm")
    except (OSError, json.JSONDecodeError):
        return False
