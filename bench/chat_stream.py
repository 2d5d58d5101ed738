"""One greedy Chat stream over gRPC, read to its end and timed on the client's clock.

The chat part (one stream against in-process generate), the streams part (many at once) and the
Envoy part (direct gRPC against JSON through Envoy) read their streams the same way; each turns
the reading into its own record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import grpc.aio

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc


def glm_stub(channel: grpc.Channel | grpc.aio.Channel) -> pb_grpc.GlmServiceStub:
    """A GlmService stub on `channel` (grpc's own generated client)."""
    # The generated constructor carries no annotations.
    return pb_grpc.GlmServiceStub(channel)  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class StreamRead:
    """What one stream returned; times are time.perf_counter() readings."""

    sent: float
    # When the first chunk with content arrived (None: no content at all).
    first_token: float | None
    ended: float
    chunks: int
    text: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int
    # The error that ended the stream early; `text` then holds what came before it.
    error: grpc.RpcError | None = None


def read_greedy_stream(
    stub: pb_grpc.GlmServiceStub, prompt: str, max_tokens: int, timeout_s: float
) -> StreamRead:
    """Send `prompt` as one user message at temperature 0 and read the reply stream."""
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=prompt)],
        temperature=0.0,
        max_tokens=max_tokens,
    )
    pieces: list[str] = []
    first: float | None = None
    finish = ""
    usage = pb.Usage()
    chunks = 0
    error: grpc.RpcError | None = None
    sent = time.perf_counter()
    try:
        for response in stub.Chat(request, timeout=timeout_s):
            chunks += 1
            choice = response.choices[0]
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter()
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
                usage = response.usage
    except grpc.RpcError as exc:
        error = exc
    return StreamRead(
        sent=sent,
        first_token=first,
        ended=time.perf_counter(),
        chunks=chunks,
        text="".join(pieces),
        finish_reason=finish,
        completion_tokens=usage.completion_tokens,
        prompt_tokens=usage.prompt_tokens,
        error=error,
    )
