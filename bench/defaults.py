"""The workloads' default sizes and the targets they are judged by, importable without torch."""

from __future__ import annotations

from bench.report import Target

# Chat: a prompt that SmolLM2 does not finish within 128 tokens (finish_reason is checked).
DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."
CHAT_TOKENS = 128
# Interleaved repeats of every in-process / server pair; results are medians over them.
REPEATS = 3
# First-token pairs: one prefill each, so many are cheap, and the difference they measure is
# small next to the prefill, so many are needed.
TTFT_SAMPLES = 10
# Embeddings: CONCURRENCY simultaneous one-sentence calls per round, ROUNDS rounds per pass.
CONCURRENCY = 32
ROUNDS = 10

# server tok/s / in-process generate tok/s
CHAT_TOK_S_RATIO_TARGET = Target(">=", 0.9)
# server time to first token minus in-process prefill + first token, in ms
CHAT_ADDED_TTFT_MS_TARGET = Target("<", 20.0)
# server sentences/s / in-process encode at batch 32 sentences/s
EMBED_RATIO_TARGET = Target(">=", 0.7)
