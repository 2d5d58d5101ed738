"""Chat benchmark: one greedy gRPC stream against ``model.generate`` on the same weights.

Both sides generate the same number of tokens from the same prompt ids with the same dtype and
torch's default thread count, one after the other (never at the same time: they share the cores).
Throughput is end to end on both sides (prefill included), so the ratio is what a client gets
from the server compared with calling transformers itself.

One limit of a single run: the same prefill has been measured 105-136 ms in six fresh processes
on this machine (decode steps vary by about 2%), so "TTFT added by the server" carries that
process-to-process spread on top of what the server really adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.chat_stream import read_greedy_stream
from bench.defaults import CHAT_ADDED_TTFT_MS_TARGET, CHAT_TOK_S_RATIO_TARGET, DEFAULT_PROMPT
from bench.report import Metric, median
from glm.v1 import glm_service_pb2_grpc as pb_grpc

# Warm-up length: enough to run prefill and a few decode steps through every code path once.
_WARMUP_TOKENS = 8


@dataclass(frozen=True, slots=True)
class StreamRun:
    """One Chat stream as its client saw it; times are seconds from sending the request."""

    ttft_s: float
    total_s: float
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str
    chunks: int
    text: str

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over the whole call, prefill included (as for model.generate)."""
        return self.completion_tokens / self.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the first: the decode loop alone."""
        return (self.completion_tokens - 1) / max(self.total_s - self.ttft_s, 1e-9)


@dataclass(frozen=True, slots=True)
class RawRun:
    """One in-process throughput repeat: generate(1) and generate(N), in seconds."""

    generate_1_s: float
    generate_n_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens over the whole generate call."""
        return self.tokens / self.generate_n_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over generate(N) minus generate(1)."""
        return (self.tokens - 1) / max(self.generate_n_s - self.generate_1_s, 1e-9)


@dataclass(frozen=True, slots=True)
class TtftPair:
    """Time to first token, in-process and through the server, taken one right after the other.

    Pairs rather than two separate medians: the difference is a few milliseconds on top of a
    prefill of a hundred or more, and load from other processes drifts slower than one pair.
    """

    raw_s: float
    server_s: float
    # The same prefill computing logits for every prompt position, as a plain forward() does.
    raw_all_logits_s: float

    @property
    def added_s(self) -> float:
        return self.server_s - self.raw_s


@dataclass(slots=True)
class ChatResults:
    """Every sample of the chat benchmark and what is derived from them."""

    prompt: str
    tokens: int
    prompt_tokens: int
    dtype: str
    torch_threads: int
    raw: list[RawRun] = field(default_factory=list)
    server: list[StreamRun] = field(default_factory=list)
    ttft: list[TtftPair] = field(default_factory=list)
    raw_text: str = ""

    @property
    def raw_tok_s(self) -> float:
        return median([r.tokens_per_s for r in self.raw])

    @property
    def server_tok_s(self) -> float:
        return median([s.tokens_per_s for s in self.server])

    @property
    def tok_s_ratio(self) -> float:
        """The median of the per-repeat ratios.

        Each pair ran back to back, so background load that drifts cancels out better than in a
        ratio of the two medians (which as_dict() also reports).
        """
        return median(
            [s.tokens_per_s / r.tokens_per_s for r, s in zip(self.raw, self.server, strict=True)]
        )

    @property
    def decode_ratio(self) -> float:
        """As tok_s_ratio, for the tokens after the first (the decode loop without prefill)."""
        return median(
            [
                s.decode_tokens_per_s / r.decode_tokens_per_s
                for r, s in zip(self.raw, self.server, strict=True)
            ]
        )

    @property
    def server_ttft_ms(self) -> float:
        return 1000 * median([p.server_s for p in self.ttft])

    @property
    def raw_first_token_ms(self) -> float:
        return 1000 * median([p.raw_s for p in self.ttft])

    @property
    def raw_all_logits_ms(self) -> float:
        return 1000 * median([p.raw_all_logits_s for p in self.ttft])

    @property
    def raw_generate_1_ms(self) -> float:
        return 1000 * median([r.generate_1_s for r in self.raw])

    @property
    def added_ttft_ms(self) -> float:
        return 1000 * median([p.added_s for p in self.ttft])

    @property
    def finish_reasons(self) -> list[str]:
        return [s.finish_reason for s in self.server]

    @property
    def outputs_match(self) -> bool:
        """Whether greedy decoding gave the same text in both places (a sanity check)."""
        return all(s.text == self.raw_text for s in self.server)

    def metrics(self) -> list[Metric]:
        """The lines of the final table."""
        return [
            Metric("chat: raw generate tok/s", self.raw_tok_s, "tok/s", digits=1),
            Metric("chat: server tok/s", self.server_tok_s, "tok/s", digits=1),
            Metric(
                "chat: server tok/s / raw generate tok/s",
                self.tok_s_ratio,
                "",
                CHAT_TOK_S_RATIO_TARGET,
            ),
            Metric("chat: the same ratio, decode only (tokens 2..N)", self.decode_ratio),
            Metric("chat: server TTFT", self.server_ttft_ms, "ms", digits=1),
            Metric("chat: in-process prefill + 1st token", self.raw_first_token_ms, "ms", digits=1),
            Metric(
                "chat: TTFT added by the server",
                self.added_ttft_ms,
                "ms",
                CHAT_ADDED_TTFT_MS_TARGET,
                1,
            ),
        ]

    def as_dict(self) -> dict[str, Any]:
        """Samples and summaries, JSON-ready."""
        return {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "dtype": self.dtype,
            "torch_threads": self.torch_threads,
            "raw_tok_s": self.raw_tok_s,
            "server_tok_s": self.server_tok_s,
            "tok_s_ratio": self.tok_s_ratio,
            "tok_s_ratio_of_medians": self.server_tok_s / self.raw_tok_s,
            "decode_ratio": self.decode_ratio,
            "server_ttft_ms": self.server_ttft_ms,
            "raw_first_token_ms": self.raw_first_token_ms,
            "raw_all_logits_first_token_ms": self.raw_all_logits_ms,
            "raw_generate_1_ms": self.raw_generate_1_ms,
            "added_ttft_ms": self.added_ttft_ms,
            "finish_reasons": self.finish_reasons,
            "outputs_match": self.outputs_match,
            "raw_runs": [asdict(r) for r in self.raw],
            "ttft_pairs": [asdict(p) for p in self.ttft],
            "server_runs": [
                {k: v for k, v in asdict(s).items() if k != "text"} for s in self.server
            ],
        }


class InProcessChat:
    """The chat model loaded with transformers in this process, used the plain way."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """The prompt as the server builds it: one user message and the generation prompt."""
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return torch.tensor([[int(i) for i in ids]], dtype=torch.long)

    @torch.inference_mode()
    def first_token_s(self, ids: torch.Tensor, *, all_logits: bool = False) -> float:
        """Seconds for one forward pass over the prompt plus the greedy choice of a token.

        Only the last position's logits are computed, as generate() does: the first token needs
        no others. With `all_logits`, the LM head runs on every prompt position (forward()'s
        default), to show what that costs.
        """
        started = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=0 if all_logits else 1)
        int(out.logits[0, -1].argmax())
        return time.perf_counter() - started

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
        """Seconds for exactly `tokens` greedy tokens, and the ids generated."""
        started = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=tokens,
            # Forces the full length even if the model wants to stop, so both sides do N steps.
            min_new_tokens=tokens,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        elapsed = time.perf_counter() - started
        return elapsed, [int(t) for t in out[0, ids.shape[1] :]]


def stream_once(
    stub: pb_grpc.GlmServiceStub, prompt: str, max_tokens: int, timeout_s: float = 300.0
) -> StreamRun:
    """Run one greedy Chat stream and time it from the client's side."""
    read = read_greedy_stream(stub, prompt, max_tokens, timeout_s)
    if read.error is not None:
        raise read.error
    total = read.ended - read.sent
    return StreamRun(
        ttft_s=total if read.first_token is None else read.first_token - read.sent,
        total_s=total,
        completion_tokens=read.completion_tokens,
        prompt_tokens=read.prompt_tokens,
        finish_reason=read.finish_reason,
        chunks=read.chunks,
        text=read.text,
    )


def run_chat(
    raw: InProcessChat,
    target: str,
    *,
    tokens: int,
    repeats: int,
    ttft_samples: int,
    prompt: str = DEFAULT_PROMPT,
    say: Callable[[str], None] = print,
) -> ChatResults:
    """Interleave in-process and server runs; never both at once.

    First `repeats` pairs of full-length generations (throughput), then `ttft_samples` pairs of
    first tokens (a one-token stream costs one prefill, so many samples are cheap).
    """
    ids = raw.prompt_ids(prompt)
    results = ChatResults(
        prompt=prompt,
        tokens=tokens,
        prompt_tokens=int(ids.shape[1]),
        dtype=str(raw.dtype).removeprefix("torch."),
        torch_threads=torch.get_num_threads(),
    )
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GlmServiceStub(channel)
        # Warm-up, not timed: the first calls pay for lazy initialisation (allocator pools,
        # kernel selection) on both sides and for the HTTP/2 connection on the client.
        raw.first_token_s(ids)
        raw.generate(ids, _WARMUP_TOKENS)
        warm = stream_once(stub, prompt, _WARMUP_TOKENS)
        if warm.prompt_tokens != results.prompt_tokens:
            say(
                f"  warning: the server's prompt is {warm.prompt_tokens} tokens, the in-process "
                f"one {results.prompt_tokens}: the two sides do not run the same prompt"
            )
        for i in range(repeats):
            gen1, _ = raw.generate(ids, 1)
            gen_n, new_ids = raw.generate(ids, tokens)
            raw_run = RawRun(gen1, gen_n, len(new_ids))
            results.raw.append(raw_run)
            results.raw_text = raw.tokenizer.decode(new_ids, skip_special_tokens=True)
            run = stream_once(stub, prompt, tokens)
            results.server.append(run)
            say(
                f"  tok/s {i + 1}/{repeats}: raw generate {raw_run.tokens_per_s:5.1f} | server "
                f"{run.tokens_per_s:5.1f} (ratio {run.tokens_per_s / raw_run.tokens_per_s:.3f}; "
                f"{run.completion_tokens} tokens in {run.chunks} chunks, "
                f"finish {run.finish_reason!r})"
            )
        for _ in range(ttft_samples):
            all_logits = raw.first_token_s(ids, all_logits=True)
            first = raw.first_token_s(ids)
            server_first = stream_once(stub, prompt, 1).ttft_s
            results.ttft.append(TtftPair(first, server_first, all_logits))
        say(
            "  first token, "
            + ", ".join(f"{1000 * p.added_s:+.0f}" for p in results.ttft)
            + " ms added by the server in each of "
            f"{ttft_samples} pairs (in-process ~{results.raw_first_token_ms:.0f} ms)"
        )
    if any(r != "length" for r in results.finish_reasons):
        say(
            "  note: the server stopped before max_tokens on some runs; its tok/s counts the "
            "tokens it did generate, but try another --prompt for a like-for-like comparison"
        )
    return results
