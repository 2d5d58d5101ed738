"""Next-token selection from logits, per request, following its SamplingParams."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.domain import SamplingParams

__all__ = ["TokenSampler"]

# A transformers logits processor: (input_ids (batch, seq), scores (batch, vocab)) -> scores.
_Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# torch.Generator.manual_seed takes seeds in [0, 2**64); fold any client seed into that range.
_SEED_MASK = (1 << 64) - 1


class TokenSampler:
    """Choose each next token of one generation: argmax at temperature 0, else a seeded draw.

    Each sampler owns its random generator, so concurrent requests never share RNG state and a
    request with a seed is reproducible whatever else the server is doing.
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self._device = torch.device(device)
        self._greedy = params.greedy
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.seed: int = seed & _SEED_MASK
        self._generator = torch.Generator(self._device)
        self._generator.manual_seed(self.seed)
        self._processors = self._build_processors(params)

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax rather than drawn."""
        return self._greedy

    @property
    def uses_history(self) -> bool:
        """Whether picks read the ids so far (the repetition penalty does; nothing else)."""
        return bool(self._processors) and isinstance(
            self._processors[0], RepetitionPenaltyLogitsProcessor
        )

    def _build_processors(self, params: SamplingParams) -> list[_Processor]:
        """The transformers processors to apply, in order, leaving out those that are no-ops."""
        processors: list[_Processor] = []
        # The processors validate with isinstance(..., float), so ints from callers are converted.
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
        if self._greedy:
            # Temperature, top-k and top-p never change which token has the highest score.
            return processors
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(int(params.top_k)))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(float(params.top_p)))
        return processors

    def __call__(self, history: torch.Tensor, logits: torch.Tensor) -> int:
        """Return the next token id given the ids so far (1-D) and the next-token logits (1-D)."""
        return int(self.pick(history, logits).item())

    def pick(self, history: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """The next token id as a 0-d tensor on the sampler's device, not yet read back.

        `history`: the ids so far (1-D), needed only where `uses_history`. The scheduler reads
        every sequence's pick in one transfer per step: on a GPU each read is a sync.
        """
        with torch.inference_mode():
            # float32 keeps bf16/fp16 logits from losing precision in the softmax and the
            # cumulative sums of top-p.
            scores = logits.to(device=self._device, dtype=torch.float32).reshape(1, -1)
            if self._processors:
                if history is None:
                    if self.uses_history:
                        raise ValueError("the repetition penalty needs the ids so far")
                    history = torch.zeros(0, dtype=torch.long, device=self._device)
                # The processors work on batches: input_ids (batch, seq) and scores (batch,
                # vocab). A 1-D history must not be passed as is: the repetition penalty would
                # read it as a batch of one-token sequences.
                input_ids = history.to(device=self._device, dtype=torch.long).reshape(1, -1)
                for processor in self._processors:
                    scores = processor(input_ids, scores)
            if self._greedy:
                return scores[0].argmax()
            probs = torch.softmax(scores, dim=-1)
            return torch.multinomial(probs, num_samples=1, generator=self._generator)[0, 0]
