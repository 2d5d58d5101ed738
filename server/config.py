"""The models config file: which models to serve, where their weights come from, and their limits.

The file is TOML with one `[[models]]` table per model; see config/default.toml for every key.
Relative paths are taken from the current working directory, as the legacy API's `./model/...` were.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from server.domain import ModelKind

_KINDS = {"chat": ModelKind.CHAT, "embedding": ModelKind.EMBEDDING}
_DTYPES = {"auto", "float32", "float16", "bfloat16"}
_QUANTIZE = {"none", "int8"}
_FAMILIES = {"chatglm3"}
# Embedding: the most tokens one forward pass computes (rows x longest row, padding included) when
# the model's max_batch_tokens is unset: 32 prompts of MiniLM's full 256 tokens.
EMBED_MAX_BATCH_TOKENS = 8192
# Chat: the tokens one scheduler step feeds when the model's max_batch_tokens is unset, on a CPU
# (one per running sequence, the rest for prompt chunks; see server/engine/scheduler.py; a GPU's
# is in server/engine/device_profile.py).
CHAT_MAX_BATCH_TOKENS = 256
# The longest model id; a request naming a longer one is refused before the id is looked up.
MAX_MODEL_ID_CHARS = 256
# The characters of text one request may carry when the model's max_input_chars is unset (see
# ModelSpec.max_input_chars): far more than any prompt of the default models' token limits
# holds, and small enough that tokenizing it takes a fraction of a second of one core.
DEFAULT_MAX_INPUT_CHARS = 262144


class ConfigError(ValueError):
    """The models config file is missing, malformed or inconsistent."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One `[[models]]` entry, validated."""

    id: str
    kind: ModelKind
    # Other names requests may give for this model (the legacy ids, say); listed by ListModels.
    aliases: tuple[str, ...] = ()
    # Where the weights come from: a local folder (used when it exists), a Hugging Face Hub id, or
    # an installed pip package that carries them (`package`, optionally a `subdir` inside it).
    path: Path | None = None
    hub_id: str | None = None
    package: str | None = None
    subdir: str = ""
    # A GGUF file inside the source; it is converted once and cached (see server/models/sources.py).
    gguf_file: str | None = None
    # The loader to use when the checkpoint's own files do not say: "chatglm3" (see
    # server/models/chatglm3/model.py). None detects ChatGLM3 from a local config.json.
    family: str | None = None
    owned_by: str = "owner"
    # "auto" is CUDA when available, else CPU; or "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # "auto" is float16 on CUDA and float32 on CPU.
    dtype: str = "auto"
    # Whether this model serves requests that name no model of its kind (else the first one does).
    default: bool = False
    # Whether the server refuses to start when this model fails to load (else: reported not ready).
    required: bool = True
    # Limits; None takes the model's own value (context window, max sequence length).
    max_input_tokens: int | None = None
    context_length: int | None = None
    max_new_tokens: int = 1024
    max_batch_prompts: int = 256
    # The most characters of text one request may carry (chat: every message and tool
    # together; embedding: all prompts of a call; Tokenize: its prompt), checked before any
    # tokenizing: a request's tokenization runs beside every other request's work.
    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS
    # Chat scheduling: sequences generated at once, and requests allowed to wait for a slot.
    max_concurrent: int = 4
    max_waiting: int = 64
    # Embedding batching: the most prompts per forward pass, and how long a batch waits to fill.
    batch_size: int = 32
    # Embedding: how long a forward pass waits for more requests; chat: how long an idle
    # scheduler waits for more before its first pass. Either wait ends after a short gap with no
    # new request.
    batch_wait_ms: float = 10.0
    # The token budget of one forward pass; None takes the kind's default (embedding: prompts are
    # packed into passes of at most this many tokens, padding included; EMBED_MAX_BATCH_TOKENS).
    # Chat: the tokens of one scheduler step, one per running sequence plus a prompt chunk of the
    # rest, so it must exceed max_concurrent (CHAT_MAX_BATCH_TOKENS).
    max_batch_tokens: int | None = None
    # Embedding: compute passes without padding where the model allows it (checked when it
    # loads; see server/models/packed_encoder.py); false keeps sentence-transformers' padded
    # encode.
    unpadded: bool = True
    # Chat: memory for the prefix cache, the keys and values of prompt chunks already computed,
    # reused by later prompts that start the same way (server/engine/prefix_cache.py); 0 turns
    # it off. Reuse gives the same bits as computing, so greedy output does not change.
    prefix_cache_mb: int = 128
    # Chat: decode passes of Llama-family models in few operations per layer
    # (server/engine/lean_decode.py), checked against the model's own forward when the batch
    # opens; false always runs the model's own forward.
    lean_decode: bool = True
    # Chat on a CPU: the lean decode pass compiled by torch.compile, one graph per bucket of row
    # counts, at start-up (server/engine/compiled_decode.py); checked like the lean pass.
    compile_decode: bool = False
    # Chat on a CPU: "int8" stores the linear layers' weights as int8, checked against the
    # float32 logits when the model loads (server/models/int8_linear.py); "none" keeps the dtype.
    quantize: str = "none"

    @property
    def source(self) -> str:
        """A human-readable name of where the weights come from, for logs and errors."""
        if self.path is not None and (self.path.exists() or self.hub_id is None):
            return str(self.path)
        if self.hub_id is not None:
            return f"hub:{self.hub_id}"
        return f"package:{self.package}" + (f"/{self.subdir}" if self.subdir else "")


def _spec_from_table(table: dict[str, Any], index: int) -> ModelSpec:
    where = f"models[{index}]" + (f" ({table['id']})" if "id" in table else "")
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
    if not isinstance(table.get("id"), str) or not table["id"]:
        raise ConfigError(f"{where}: 'id' must be a non-empty string")
    if len(table["id"]) > MAX_MODEL_ID_CHARS:
        raise ConfigError(f"{where}: 'id' must be at most {MAX_MODEL_ID_CHARS} characters")
    kind = _KINDS.get(str(table.get("kind", "")))
    if kind is None:
        raise ConfigError(f"{where}: 'kind' must be one of {sorted(_KINDS)}")
    values = dict(table, kind=kind)
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(
        isinstance(a, str) and a and len(a) <= MAX_MODEL_ID_CHARS for a in aliases
    ):
        raise ConfigError(
            f"{where}: 'aliases' must be a list of non-empty strings of at most "
            f"{MAX_MODEL_ID_CHARS} characters"
        )
    values["aliases"] = tuple(aliases)
    if "path" in values:
        values["path"] = Path(str(values["path"])).expanduser()
    if not any(values.get(k) for k in ("path", "hub_id", "package")):
        raise ConfigError(f"{where}: give at least one of 'path', 'hub_id' or 'package'")
    if values.get("dtype", "auto") not in _DTYPES:
        raise ConfigError(f"{where}: 'dtype' must be one of {sorted(_DTYPES)}")
    if values.get("family") is not None and (
        values["family"] not in _FAMILIES or kind is not ModelKind.CHAT
    ):
        raise ConfigError(f"{where}: 'family' must be one of {sorted(_FAMILIES)} (chat models)")
    try:
        spec = ModelSpec(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    for name in (
        "max_new_tokens",
        "max_batch_prompts",
        "max_concurrent",
        "batch_size",
        "max_input_chars",
    ):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            raise ConfigError(f"{where}: '{name}' must be a positive integer")
    for name in ("max_input_tokens", "context_length", "max_batch_tokens"):
        value = getattr(spec, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}: '{name}' must be a positive integer")
    chat_budget = spec.max_batch_tokens or CHAT_MAX_BATCH_TOKENS
    if kind is ModelKind.CHAT and chat_budget <= spec.max_concurrent:
        raise ConfigError(
            f"{where}: 'max_batch_tokens' ({chat_budget}) must be larger than 'max_concurrent' "
            f"({spec.max_concurrent}): a step holds one token per running sequence plus a chunk "
            "of a prompt"
        )
    if spec.quantize not in _QUANTIZE or (spec.quantize != "none" and kind is not ModelKind.CHAT):
        raise ConfigError(f"{where}: 'quantize' must be one of {sorted(_QUANTIZE)} (chat models)")
    if not isinstance(spec.prefix_cache_mb, int) or spec.prefix_cache_mb < 0:
        raise ConfigError(f"{where}: 'prefix_cache_mb' must be a non-negative integer")
    if not isinstance(spec.lean_decode, bool):
        raise ConfigError(f"{where}: 'lean_decode' must be true or false")
    if not isinstance(spec.compile_decode, bool):
        raise ConfigError(f"{where}: 'compile_decode' must be true or false")
    if not isinstance(spec.unpadded, bool):
        raise ConfigError(f"{where}: 'unpadded' must be true or false")
    if spec.max_waiting < 0 or spec.batch_wait_ms < 0:
        raise ConfigError(f"{where}: 'max_waiting' and 'batch_wait_ms' must not be negative")
    return spec


def load_model_specs(path: Path) -> tuple[ModelSpec, ...]:
    """Read and validate the models config file."""
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"models config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    tables = document.get("models")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: expected at least one [[models]] table")
    specs = tuple(_spec_from_table(t, i) for i, t in enumerate(tables))
    # A name (id or alias) must select one model.
    names = [name for s in specs for name in (s.id, *s.aliases)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: model ids or aliases used twice: {duplicates}")
    for kind in ModelKind:
        defaults = [s.id for s in specs if s.kind is kind and s.default]
        if len(defaults) > 1:
            raise ConfigError(f"{path}: several default {kind.value} models: {defaults}")
    return specs
