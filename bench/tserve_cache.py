"""How transformers serve's continuous-batching cache is sized in a run of the baseline."""

from __future__ import annotations

from dataclasses import dataclass

from bench.report import Target


@dataclass(frozen=True, slots=True)
class TserveCache:
    """A named cache sizing; None leaves that setting to transformers serve's own default."""

    label: str
    num_blocks: int | None
    max_batch_tokens: int | None
    # What glm-api's peak RSS over this one's is judged by.
    rss_target: Target

    @property
    def option(self) -> str:
        """The label as `--tserve-cache` spells it."""
        return self.label.replace(" ", "-")

    def flags(self) -> list[str]:
        """The command-line flags that set what is not left to the default."""
        out: list[str] = []
        if self.num_blocks is not None:
            out += ["--cb-num-blocks", str(self.num_blocks)]
        if self.max_batch_tokens is not None:
            out += ["--cb-max-batch-tokens", str(self.max_batch_tokens)]
        return out

    def describe(self) -> str:
        """The label and the flags, for the progress log."""
        flags = " ".join(self.flags())
        return f"{self.label} ({flags})" if flags else f"{self.label} (its defaults)"
