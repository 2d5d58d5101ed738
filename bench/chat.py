"""Chat part: one greedy gRPC stream against ``model.generate`` on the same weights.

Both sides generate the same number of tokens from the same prompt ids with the same dtype and
torch's default thread count, taking turns (never at the same time: they share the cores).
Throughput is end to end on both sides (prefill included), so the ratio is what a client gets
from the server compared with calling transformers itself. The time to first token the server
adds is measured in back-to-back pairs (in-process prefill and first token, then a one-token
stream): it is small next to a prefill, and load from other processes drifts slower than a pair.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.chat_stream import glm_stub, read_greedy_stream
from bench.defaults import CHAT_ADDED_TTFT_MS_TARGET, CHAT_TOK_S_RATIO_TARGET
from bench.load import BackgroundLoad, is_noisy
from bench.report import Metric, Say, Section, flagged, median
from bench.server_process import ServerProcess

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
    text: str

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over the whole call, prefill included (as for model.generate)."""
        return self.completion_tokens / self.total_s


@dataclass(frozen=True, slots=True)
class RawRun:
    """One in-process generate call: its seconds and the tokens it produced."""

    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True, slots=True)
class TtftPair:
    """Time to first token, in-process and through the server, one right after the other."""

    raw_s: float
    server_s: float

    @property
    def added_s(self) -> float:
        return self.server_s - self.raw_s


@dataclass(slots=True)
class ChatResults:
    """Every sample of the chat part and what is derived from them."""

    prompt: str
    tokens: int
    prompt_tokens: int
    dtype: str
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
        """The median of the per-repeat ratios: each pair ran back to back, so load that drifts
        cancels out better than in a ratio of two medians."""
        return median(
            [s.tokens_per_s / r.tokens_per_s for r, s in zip(self.raw, self.server, strict=True)]
        )

    @property
    def server_ttft_ms(self) -> float:
        return 1000 * median([p.server_s for p in self.ttft])

    @property
    def raw_first_token_ms(self) -> float:
        return 1000 * median([p.raw_s for p in self.ttft])

    @property
    def added_ttft_ms(self) -> float:
        return 1000 * median([p.added_s for p in self.ttft])

    @property
    def outputs_match(self) -> bool:
        """Whether greedy decoding gave the same text in both places (a sanity check)."""
        return all(s.text == self.raw_text for s in self.server)

    def metrics(self) -> list[Metric]:
        """The lines of the final table."""
        return [
            Metric("chat: in-process generate", self.raw_tok_s, "tok/s", digits=1),
            Metric("chat: server stream", self.server_tok_s, "tok/s", digits=1),
            Metric(
                "chat: server tok/s / in-process generate tok/s",
                self.tok_s_ratio,
                target=CHAT_TOK_S_RATIO_TARGET,
            ),
            Metric("chat: server time to first token", self.server_ttft_ms, "ms", digits=1),
            Metric("chat: in-process prefill + 1st token", self.raw_first_token_ms, "ms", digits=1),
            Metric(
                "chat: time to first token added by the server",
                self.added_ttft_ms,
                "ms",
                CHAT_ADDED_TTFT_MS_TARGET,
                digits=1,
            ),
        ]

    def as_dict(self) -> dict[str, Any]:
        """Samples and summaries, JSON-ready."""
        return {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "dtype": self.dtype,
            "raw_tok_s": self.raw_tok_s,
            "server_tok_s": self.server_tok_s,
            "tok_s_ratio": self.tok_s_ratio,
            "server_ttft_ms": self.server_ttft_ms,
            "raw_first_token_ms": self.raw_first_token_ms,
            "added_ttft_ms": self.added_ttft_ms,
            "outputs_match": self.outputs_match,
            "finish_reasons": [s.finish_reason for s in self.server],
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
    def first_token_s(self, ids: torch.Tensor) -> float:
        """Seconds for one forward pass over the prompt plus the greedy choice of a token.

        Only the last position's logits are computed, as generate() does.
        """
        started = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
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


def stream_once(channel: grpc.Channel, prompt: str, max_tokens: int) -> StreamRun:
    """Run one greedy Chat stream and time it from the client's side."""
    read = read_greedy_stream(glm_stub(channel), prompt, max_tokens, timeout_s=300.0)
    if read.error is not None:
        raise read.error
    total = read.ended - read.sent
    return StreamRun(
        ttft_s=total if read.first_token is None else read.first_token - read.sent,
        total_s=total,
        completion_tokens=read.completion_tokens,
        prompt_tokens=read.prompt_tokens,
        finish_reason=read.finish_reason,
        text=read.text,
    )


def run_chat(
    raw: InProcessChat,
    target: str,
    *,
    tokens: int,
    repeats: int,
    ttft_samples: int,
    prompt: str,
    say: Say,
) -> ChatResults:
    """Interleave in-process and server runs, never both at once: `repeats` pairs of full-length
    generations (throughput), then `ttft_samples` pairs of first tokens."""
    ids = raw.prompt_ids(prompt)
    results = ChatResults(
        prompt=prompt,
        tokens=tokens,
        prompt_tokens=int(ids.shape[1]),
        dtype=str(raw.dtype).removeprefix("torch."),
    )
    with grpc.insecure_channel(target) as channel:
        # Warm-up, not timed: the first calls pay for lazy initialisation (allocator pools,
        # kernel selection) on both sides and for the HTTP/2 connection on the client.
        raw.first_token_s(ids)
        raw.generate(ids, _WARMUP_TOKENS)
        warm = stream_once(channel, prompt, _WARMUP_TOKENS)
        if warm.prompt_tokens != results.prompt_tokens:
            say(
                f"  warning: the server's prompt is {warm.prompt_tokens} tokens, the in-process "
                f"one {results.prompt_tokens}: the two sides do not run the same prompt"
            )
        for i in range(repeats):
            seconds, new_ids = raw.generate(ids, tokens)
            raw_run = RawRun(seconds, len(new_ids))
            results.raw.append(raw_run)
            results.raw_text = raw.tokenizer.decode(new_ids, skip_special_tokens=True)
            run = stream_once(channel, prompt, tokens)
            results.server.append(run)
            say(
                f"  tok/s {i + 1}/{repeats}: in-process {raw_run.tokens_per_s:5.1f} | server "
                f"{run.tokens_per_s:5.1f} (ratio {run.tokens_per_s / raw_run.tokens_per_s:.3f}; "
                f"finish {run.finish_reason!r})"
            )
        for _ in range(ttft_samples):
            first = raw.first_token_s(ids)
            results.ttft.append(TtftPair(first, stream_once(channel, prompt, 1).ttft_s))
        say(
            "  first token: "
            + ", ".join(f"{1000 * p.added_s:+.0f}" for p in results.ttft)
            + f" ms added by the server (in-process ~{results.raw_first_token_ms:.0f} ms)"
        )
    if any(s.finish_reason != "length" for s in results.server):
        say(
            "  note: the server stopped before max_tokens on some runs; try another --prompt for "
            "a like-for-like comparison"
        )
    return results


def run(args: argparse.Namespace, say: Say) -> Section:
    """The chat part: the in-process model, then a server of its own, then the pairs."""
    from bench.models import chat_model_folder, default_spec, quiet_transformers, server_settings
    from server.domain import ModelKind
    from server.models.sources import resolve_dtype

    quiet_transformers()
    settings = server_settings()
    spec = default_spec(ModelKind.CHAT, settings)
    folder = chat_model_folder(spec, settings)
    dtype = resolve_dtype(spec, torch.device("cpu"))
    say(f"chat: in-process {spec.id} ({dtype}) from {folder}")
    # Loaded before the server starts, so that the server's start-up time is its own.
    raw = InProcessChat(folder, dtype)
    with ServerProcess() as server:
        say(f"chat: python -m server on {server.target} (pid {server.pid})")
        server.wait_ready()
        say(
            f"chat: {args.repeats} x (in-process generate, server stream) of {args.tokens} "
            f"greedy tokens, then {args.ttft_samples} first-token pairs; prompt {args.prompt!r}"
        )
        load = BackgroundLoad(server.pid)
        before = load.snapshot()
        results = run_chat(
            raw,
            server.target,
            tokens=args.tokens,
            repeats=args.repeats,
            ttft_samples=args.ttft_samples,
            prompt=args.prompt,
            say=say,
        )
        busy = load.cores_between(before, load.snapshot())
    say(
        f"  prompt {results.prompt_tokens} tokens; server and in-process text "
        f"{'identical' if results.outputs_match else 'DIFFER'}"
    )
    metrics = [*results.metrics(), Metric("chat: other processes' CPU load", busy, "cores")]
    return Section(
        results.as_dict() | {"server": server.figures(), "background_cores": busy},
        flagged(metrics, is_noisy(busy)) + server.metrics("chat"),
    )
