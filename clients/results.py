"""Plain results built from glm.v1 responses: the aggregated reply of a chat stream."""

from __future__ import annotations

from dataclasses import dataclass, field

from glm.v1 import glm_service_pb2


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The token counts of a call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_proto(cls, usage: glm_service_pb2.Usage) -> TokenUsage:
        """Copy a ``Usage`` proto."""
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


@dataclass(frozen=True, slots=True)
class ChatResult:
    """The whole reply of one Chat call.

    Attributes:
        text: The assistant's reply.
        finish_reason: Why generation ended: "stop" or "length"; empty if the stream ended
            without saying (e.g. a server that never sent its last chunk).
        usage: The token counts from the last chunk; zeros if the server sent none.
        model: The id of the model that answered.
        id: The id of the call.
    """

    text: str
    finish_reason: str
    usage: TokenUsage = field(default_factory=TokenUsage)
    model: str = ""
    id: str = ""


class ChatAccumulator:
    """Folds the responses of a Chat stream into a ``ChatResult``, chunk by chunk.

    ``add`` returns the text each response adds, which lets a caller print a reply as it streams
    and still get the totals at the end (the CLI does both).

    Args:
        chunk: The ``chunk`` flag the request was sent with: True means each response carries
            only new text, False means each carries the whole text so far.
    """

    def __init__(self, *, chunk: bool = True) -> None:
        self._chunk = chunk
        # Pieces are joined once at the end; repeated str concatenation is quadratic in theory.
        self._pieces: list[str] = []
        self._finish_reason = ""
        self._usage = TokenUsage()
        self._model = ""
        self._id = ""

    def add(self, response: glm_service_pb2.ChatResponse) -> str:
        """Take in the next response of the stream and return the text it adds."""
        if not self._id:
            self._id = response.id
        if not self._model:
            self._model = response.model
        if response.HasField("usage"):
            self._usage = TokenUsage.from_proto(response.usage)
        added = ""
        # glm-api always sends exactly one choice, index 0; ignoring any other keeps a stray
        # choice from interleaving its text into the reply.
        for choice in response.choices:
            if choice.index != 0:
                continue
            if choice.finish_reason:
                self._finish_reason = choice.finish_reason
            if choice.HasField("message"):
                # A stream=false reply: the message holds the whole text.
                added += self._replace(choice.message.content)
            elif self._chunk:
                added += self._append(choice.delta.content)
            elif choice.delta.content:
                # The whole text so far never shrinks to nothing; an empty delta (e.g. on the
                # last chunk, which may carry only finish_reason and usage) adds nothing.
                added += self._replace(choice.delta.content)
        return added

    def _append(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def _replace(self, whole: str) -> str:
        """Make ``whole`` the text so far and return what it adds to the previous text."""
        previous = self.text
        self._pieces = [whole] if whole else []
        # A cumulative chunk normally extends the previous one; if it ever rewrites it, the
        # whole new text is the best description of what changed.
        return whole[len(previous) :] if whole.startswith(previous) else whole

    @property
    def text(self) -> str:
        """The reply received so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def result(self) -> ChatResult:
        """The reply and metadata received so far."""
        return ChatResult(
            text=self.text,
            finish_reason=self._finish_reason,
            usage=self._usage,
            model=self._model,
            id=self._id,
        )
