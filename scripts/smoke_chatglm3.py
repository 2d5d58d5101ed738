"""Smoke test of the production models with real weights: load, chat, embed; speed and memory.

For a machine with the weights (and, for reasonable speed, a GPU). It loads every model of the
config through the server's own model classes (the same code `python -m server` runs), streams one
greedy chat reply to stdout, embeds one text with each embedding model, and reports load time,
prefill and decode speed, and peak memory (CUDA's max_memory_allocated on GPU, else the process's
peak RSS).

Usage (from the project root, after downloading the weights into ./model/, see the README)::

    .venv/bin/python scripts/smoke_chatglm3.py
    .venv/bin/python scripts/smoke_chatglm3.py --prompt "用一句话介绍北京" --max-tokens 128
    .venv/bin/python scripts/smoke_chatglm3.py --models chatglm3-6b-32k --config my.toml

The config defaults to $GLM_CONFIG, else config/chatglm3.toml; converted checkpoints are cached
under $GLM_CACHE_DIR as the server does (the first ChatGLM3 run converts, later runs reuse it).
Exit status 0 when every model loaded and answered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(PROJECT), str(PROJECT / "gen")]

from server.config import ModelSpec, load_model_specs  # noqa: E402 (after the path set-up)
from server.domain import ChatMessage, Role  # noqa: E402
from server.engine.detokenize import IncrementalDetokenizer  # noqa: E402
from server.models.base import ChatModel, EmbeddingModel  # noqa: E402
from server.models.loader import load_model  # noqa: E402
from server.settings import load_settings  # noqa: E402


def peak_memory() -> str:
    """Peak memory: GPU memory torch allocated for this model (all GPUs), else the process's peak
    RSS since it started (so it includes models loaded before)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        gib = (
            sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
            / 2**30
        )
        return f"{gib:.2f} GiB GPU (max_memory_allocated, all GPUs)"
    # Linux reports ru_maxrss in KiB.
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def smoke_chat(model: ChatModel, prompt: str, max_tokens: int) -> None:
    """Stream one greedy reply and print prefill and decode speed."""
    ids = model.build_prompt([ChatMessage(Role.USER, prompt)])
    detok = IncrementalDetokenizer(model.decoder, ids)
    print(f"\n> {prompt}\n", flush=True)
    started = time.perf_counter()
    logits, cache = model.forward(ids, None)
    prefill_s = time.perf_counter() - started
    generated = 0
    decode_started = time.perf_counter()
    while generated < max_tokens:
        token = int(torch.argmax(logits))
        generated += 1
        if token in model.stop_token_ids:
            break
        print(detok.push(token), end="", flush=True)
        logits, cache = model.forward([token], cache)
    print(detok.flush(), flush=True)
    decode_s = time.perf_counter() - decode_started
    print(
        f"\n[chat] prompt {len(ids)} tokens, prefill {prefill_s:.2f} s "
        f"({len(ids) / prefill_s:.1f} tok/s); {generated} tokens generated in {decode_s:.2f} s "
        f"({generated / decode_s:.1f} tok/s)"
    )


def smoke_embed(model: EmbeddingModel, text: str) -> None:
    """Embed one text and print the vector's size, norm and head."""
    started = time.perf_counter()
    vector = model.encode([text])[0]
    elapsed = time.perf_counter() - started
    head = ", ".join(f"{v:.4f}" for v in vector[:5])
    print(
        f"[embed] {len(vector)} dimensions, norm {float((vector**2).sum() ** 0.5):.4f}, "
        f"[{head}, ...] in {elapsed * 1000:.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("GLM_CONFIG") or PROJECT / "config" / "chatglm3.toml"),
    )
    parser.add_argument("--models", nargs="*", help="only these model ids (default: all)")
    parser.add_argument("--prompt", default="你好，请用三句话介绍一下你自己。")
    parser.add_argument("--embed-text", default="你好，世界")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    settings = load_settings([])  # GLM_* variables, e.g. GLM_CACHE_DIR
    specs: list[ModelSpec] = [
        s for s in load_model_specs(args.config) if not args.models or s.id in args.models
    ]
    failed = 0
    for spec in specs:
        print(f"\n=== {spec.id} ({spec.kind.value}) from {spec.source}", flush=True)
        if torch.cuda.is_available():
            for device in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        try:
            model = load_model(spec, settings.cache_dir)
            print(
                f"[load] {time.perf_counter() - started:.1f} s on {model.device}; {peak_memory()}"
            )
            if isinstance(model, ChatModel):
                smoke_chat(model, args.prompt, args.max_tokens)
            elif isinstance(model, EmbeddingModel):
                smoke_embed(model, args.embed_text)
        except Exception as exc:  # report and go on with the other models
            failed += 1
            print(f"[error] {spec.id}: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"[memory] peak {peak_memory()}")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
