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

# server tok/s / in-process generate tok/s (issue 2)
CHAT_TOK_S_RATIO_TARGET = Target(">=", 0.9)
# server time to first token minus in-process prefill + first token, in ms (issue 2)
CHAT_ADDED_TTFT_MS_TARGET = Target("<", 20.0)
# server sentences/s / in-process encode of the same rounds of 32 (issue 5)
EMBED_RATIO_TARGET = Target(">=", 0.9)
# server sentences/s / one in-process encode of all the sentences at batch 32 (issue 2)
EMBED_WHOLE_SET_RATIO_TARGET = Target(">=", 0.7)

# Concurrent streams (bench/streams.py): eight prompts that SmolLM2-135M-Instruct does not finish
# within 128 greedy tokens, so every stream does the same amount of work; stream i gets prompt
# i % 8.
STREAM_PROMPTS = (
    "Write a long story about a lighthouse keeper.",
    "Write a long story about a dragon who learns to bake bread.",
    "Write a long story about two friends crossing a desert.",
    "Write a long story about a robot exploring an abandoned city.",
    "Write a long story about a girl who finds a map in her attic.",
    "Write a long story about a fisherman and a talking whale.",
    "Write a long story about a village that forgot how to sing.",
    "Write a long story about an astronaut stranded on Mars.",
)
STREAM_TOKENS = 128
# Concurrent stream counts; 32 is four times the default max_concurrent (8), so 24 of them wait
# in the server's queue.
STREAM_COUNTS = (1, 8, 32)
# The stream count whose aggregate tok/s is compared with one stream's.
STREAM_COMPARED = 8
# aggregate tok/s with 8 concurrent streams / with 1 stream (issue 5)
STREAMS_SCALING_TARGET = Target(">=", 4.0)

# Envoy (bench/envoy.py): sequential calls per path and RPC.
ENVOY_CALLS = 500
# median latency of JSON via Envoy less direct gRPC, each call's client CPU taken out (issue 3)
ENVOY_ADDED_MS_TARGET = Target("<", 1.0)
# chat tok/s of Server-Sent Events through Envoy / a direct gRPC stream (issue 3)
ENVOY_CHAT_RATIO_TARGET = Target(">=", 0.95)
