"""ChatGLM3's tokenizer, natively: SentencePiece plus nine special tokens after its vocabulary.

ChatGLM3 ships `tokenizer.model` (SentencePiece) and a Python tokenizer class that needs
trust_remote_code and no longer runs on current transformers. The format is small enough to
implement here: the SentencePiece pieces keep their ids, and the special tokens take the ids right
after them, in a fixed order ([MASK] is 64789 ... <|observation|> 64797 for the real 64789-piece
vocabulary). Computing them from the vocabulary size lets tiny test vocabularies work the same way.

Special tokens are never produced by `encode`: text such as "<|user|>" typed by a user is split into
ordinary pieces, so it can never forge a role marker. They enter a prompt only through their ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sentencepiece import SentencePieceProcessor

__all__ = ["ROLES", "SPECIAL_TOKENS", "ChatGLM3Tokenizer"]

# In id order, starting at the SentencePiece vocabulary size.
SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
# The roles that have a marker token, <|role|>.
ROLES = ("system", "user", "assistant", "observation")


class ChatGLM3Tokenizer:
    """Encodes text to ids and back; knows the special ids, the prompt prefix and the stop ids.

    SentencePiece's encode and decode are const C++ calls, safe from several threads at once, so
    no lock is needed (unlike Rust-backed fast tokenizers).
    """

    def __init__(self, processor: SentencePieceProcessor) -> None:
        self._sp = processor
        self._sp_size = int(processor.vocab_size())
        self._special_ids = {name: self._sp_size + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names = {i: name for name, i in self._special_ids.items()}
        # pad is unk in ChatGLM3; bos/eos/unk render as nothing when special tokens are skipped.
        self._control_ids = frozenset(
            i for i in (processor.unk_id(), processor.bos_id(), processor.eos_id()) if i >= 0
        )

    @classmethod
    def from_file(cls, path: Path) -> ChatGLM3Tokenizer:
        """Load `tokenizer.model`."""
        if not path.is_file():
            raise FileNotFoundError(f"ChatGLM3 tokenizer file not found: {path}")
        return cls(SentencePieceProcessor(model_file=str(path)))

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> ChatGLM3Tokenizer:
        """Load a serialized SentencePiece model (used by tests that train one in memory)."""
        return cls(SentencePieceProcessor(model_proto=model_proto))

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the special tokens (64798 for ChatGLM3)."""
        return self._sp_size + len(SPECIAL_TOKENS)

    @property
    def eos_id(self) -> int:
        """The end-of-sequence id (2)."""
        return int(self._sp.eos_id())

    @property
    def prefix_ids(self) -> list[int]:
        """[gMASK] sop: the ids that start every ChatGLM3 input."""
        return [self._special_ids["[gMASK]"], self._special_ids["sop"]]

    @property
    def stop_ids(self) -> frozenset[int]:
        """eos, <|user|> (the model hands the turn back) and <|observation|> (it awaits a tool)."""
        return frozenset({self.eos_id, self.role_id("user"), self.role_id("observation")})

    def special_id(self, name: str) -> int:
        """The id of a special token by name, e.g. "[gMASK]" or "<|user|>"."""
        return self._special_ids[name]

    def role_id(self, role: str) -> int:
        """The id of the marker <|role|> of one of ROLES."""
        if role not in ROLES:
            raise ValueError(f"ChatGLM3 has no role {role!r}; roles are {', '.join(ROLES)}")
        return self._special_ids[f"<|{role}|>"]

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is one of the nine special tokens."""
        return token_id in self._special_names

    def encode(self, text: str) -> list[int]:
        """Text to SentencePiece ids; never produces a special id."""
        return [int(i) for i in self._sp.encode(text)]

    def pieces(self, text: str) -> list[str]:
        """Text to SentencePiece pieces (e.g. "▁", "想", "逃离")."""
        return [str(p) for p in self._sp.encode(text, out_type=str)]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids to text.

        As ChatGLM3's own tokenizer does, the ids between two special tokens are decoded as one
        SentencePiece run each. Ids past the vocabulary (the output layer is padded to 65024) decode
        to nothing. With skip_special_tokens, special and control ids render as nothing and the
        text after an <|assistant|> marker is rendered as a reply (see `_reply_text`).
        """
        assistant = self._special_ids["<|assistant|>"]
        parts: list[str] = []
        run: list[int] = []
        after_assistant = False

        def flush() -> None:
            if not run:
                return
            text = str(self._sp.decode(run))
            parts.append(_reply_text(text) if after_assistant and skip_special_tokens else text)
            run.clear()

        for token_id in token_ids:
            if 0 <= token_id < self._sp_size:
                if not (skip_special_tokens and token_id in self._control_ids):
                    run.append(token_id)
                continue
            flush()
            after_assistant = token_id == assistant
            name = self._special_names.get(token_id)
            if name is not None and not skip_special_tokens:
                parts.append(name)
        flush()
        return "".join(parts)


def _reply_text(text: str) -> str:
    """The text of an assistant turn as ChatGLM3's chat() returns it.

    ChatGLM3 starts every reply with a metadata line: empty for an ordinary answer, the tool's name
    for a tool call. An empty metadata line and the whitespace after it are not part of the answer,
    so they are dropped (while only whitespace has come, nothing is rendered yet, which keeps the
    rendering of a growing reply a prefix of the next one, as streaming needs). A non-empty first
    line is kept: it names the tool, and the tool-call parser reads it.
    """
    content = text.lstrip()
    if not content:
        return ""
    head, newline, _ = text.partition("\n")
    return content if newline and not head.strip() else text
