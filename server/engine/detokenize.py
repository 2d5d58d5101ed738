"""Incremental detokenization: generated token ids in, finished pieces of text out.

Decoding each token on its own is wrong in two ways: byte-level BPE splits one multi-byte UTF-8
character across several tokens (each alone decodes to "\ufffd"), and SentencePiece-style
tokenizers drop a token's leading space when it is the first token decoded. So a small window of
ids is decoded twice, once up to the text already emitted and once with the new tokens, and only
the difference is emitted, and only once it no longer ends in an incomplete character.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.models.base import TokenDecoder

__all__ = ["INCOMPLETE_CHAR", "PROMPT_CONTEXT_TOKENS", "IncrementalDetokenizer", "TokenDecoder"]

# What decoders produce for bytes that do not (yet) form a whole UTF-8 character.
INCOMPLETE_CHAR = "\ufffd"
# How many prompt tokens to decode as context before the first generated one: enough for the
# decoder to render a leading space or merge with the previous piece, few enough to stay cheap.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turn a stream of generated token ids into text pieces that never split a character.

    Joining every piece returned by `push` and `flush` gives the same text as decoding the
    generated ids in one go (special tokens skipped), given the same prompt context.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        # Only the window still needed is kept (the classic prefix offset is always 0 here): ids
        # before `_read_offset` are context whose text was already emitted (or is the prompt's);
        # ids from `_read_offset` on are pending. Older ids are dropped as the window slides, so a
        # long generation does not grow this list or the cost of each decode.
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is partial)."""
        self._ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        # A trailing replacement character means the last token ended inside a multi-byte
        # character: wait for the tokens that complete it. Text no longer than the context means
        # the new tokens rendered nothing yet (e.g. a skipped special token): nothing to emit.
        if new_text.endswith(INCOMPLETE_CHAR) or len(new_text) <= len(prefix_text):
            return ""
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """Return whatever is still held back; call once generation has ended."""
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text):
            return ""
        # The generation is over, so an incomplete character will never be completed: emit it as
        # the decoder renders it, which is also what decoding all the ids at once gives.
        return self._emit(new_text[len(prefix_text) :])

    def _decode_window(self) -> tuple[str, str]:
        """Decode the context alone and the context with the pending ids."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[: self._read_offset], skip_special_tokens=True)
        new_text = decode(self._ids, skip_special_tokens=True)
        return prefix_text, new_text

    def _emit(self, piece: str) -> str:
        """Record `piece` as emitted and slide the window so its tokens become the context."""
        self._pieces.append(piece)
        # The emitted tokens end on a character boundary (the text did not end in a partial
        # character), so they are a sound context for what comes next; older ids are not needed.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return piece
