"""Unit tests of the glm-api Python clients and CLI against an in-process fake GlmService.

The fake is a plain servicer on a real gRPC server (thread pool, 127.0.0.1:0), so the clients go
through real channels, serialization, metadata and status codes; only the model is canned. The
same sync server also serves the asyncio client: a grpc.aio server on the test's event loop
would deadlock with the blocking client.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients import (
    AsyncGlmClient,
    ChatAccumulator,
    ChatResult,
    GlmClient,
    GlmClientError,
    TokenUsage,
    to_chat_messages,
)
from clients.__main__ import main
from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc

SERVICE = "glm.v1.GlmService"
PIECES = ("Hel", "lo", ", world")
CHAT_OPTIONAL_FIELDS = ("temperature", "top_p", "max_tokens", "top_k", "repetition_penalty", "seed")


class FakeGlmService(glm_service_pb2_grpc.GlmServiceServicer):
    """Records every request and its metadata, and answers with canned responses."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: list[object] = []
        self.metadata: list[dict[str, str]] = []
        # (code, message) to abort with; with fail_after_chunks, Chat aborts mid-stream.
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.fail_after_chunks: int | None = None
        # When set, Chat waits for it after its first chunk; lets a test act mid-stream.
        self.gate: threading.Event | None = None
        self.chat_finished = threading.Event()
        self.chat_cancelled: bool | None = None
        self.embed_dims: int | None = None

    def _record(self, request: object, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append({key: str(value) for key, value in context.invocation_metadata()})
        if self.fail is not None and self.fail_after_chunks is None:
            context.abort(*self.fail)

    def Chat(
        self, request: pb.ChatRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ChatResponse]:
        try:
            self._record(request, context)
            cumulative = request.HasField("chunk") and not request.chunk
            text = ""
            for i, piece in enumerate(PIECES):
                if self.fail is not None and self.fail_after_chunks == i:
                    context.abort(*self.fail)
                if i == 1 and self.gate is not None and not self._wait_for_gate(context):
                    self.chat_cancelled = True
                    return
                text += piece
                delta = pb.ChatDelta(role="assistant" if i == 0 else "")
                delta.content = text if cumulative else piece
                yield pb.ChatResponse(
                    id="chat-1",
                    object="chat.completion.chunk",
                    created=1_700_000_000,
                    model=request.model or "fake-chat",
                    choices=[pb.ChatChoice(index=0, delta=delta)],
                )
            # The last chunk carries no text, even with chunk=false: clients must not let it
            # erase the text so far.
            yield pb.ChatResponse(
                id="chat-1",
                object="chat.completion.chunk",
                created=1_700_000_000,
                model=request.model or "fake-chat",
                choices=[pb.ChatChoice(index=0, delta=pb.ChatDelta(), finish_reason="stop")],
                usage=pb.Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10),
            )
            self.chat_cancelled = False
        finally:
            if self.chat_cancelled is None:
                # The server closed the generator at a yield: it saw the call end early.
                self.chat_cancelled = not context.is_active()
            self.chat_finished.set()

    def _wait_for_gate(self, context: grpc.ServicerContext) -> bool:
        """Wait for the gate (5 s at most); False if the client went away meanwhile."""
        assert self.gate is not None
        deadline = time.monotonic() + 5
        while not self.gate.wait(0.01) and time.monotonic() < deadline:
            if not context.is_active():
                return False
        return context.is_active()

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        self._record(request, context)
        if self.embed_dims is not None:
            data = [pb.Embedding(index=0, values=[0.25] * self.embed_dims)]
        else:
            data = [
                pb.Embedding(index=i, values=[float(i), 0.1, float(len(prompt))])
                for i, prompt in enumerate(request.prompt)
            ]
        # Reversed on purpose: the clients must order vectors by index, not by arrival.
        return pb.EmbedResponse(
            data=list(reversed(data)),
            model=request.model or "fake-embed",
            object="embedding",
            usage=pb.Usage(prompt_tokens=len(request.prompt), total_tokens=len(request.prompt)),
            dimensions=len(data[0].values) if data else 0,
        )

    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        self._record(request, context)
        limit = request.max_tokens if request.HasField("max_tokens") else 4096
        ids = [ord(char) for char in request.prompt]
        return pb.TokenizeResponse(
            token_ids=ids[:limit],
            tokens=list(request.prompt),
            model=request.model or "fake-chat",
            object="tokenizer",
            truncated=len(ids) > limit,
        )

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        self._record(request, context)
        return pb.ListModelsResponse(
            object="list",
            data=[
                pb.Model(
                    id="fake-chat",
                    object="chat.completion",
                    ready=True,
                    default=True,
                    max_input_tokens=2048,
                    max_new_tokens=512,
                    context_length=8192,
                ),
                pb.Model(
                    id="fake-embed",
                    object="embedding",
                    ready=False,
                    dimensions=384,
                    max_input_tokens=256,
                    context_length=512,
                    max_batch_prompts=32,
                ),
            ],
            max_message_bytes=16 << 20,
        )


@dataclass
class Served:
    fake: FakeGlmService
    health: health.HealthServicer
    address: str


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    fake = FakeGlmService()
    health_servicer = health.HealthServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    glm_service_pb2_grpc.add_GlmServiceServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Served(fake, health_servicer, f"127.0.0.1:{port}")
    server.stop(grace=None)


@pytest.fixture
def fake(served: Served) -> FakeGlmService:
    served.fake.reset()
    served.health.set("", health_pb2.HealthCheckResponse.SERVING)
    served.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return served.fake


@pytest.fixture
def client(served: Served, fake: FakeGlmService) -> Iterator[GlmClient]:
    with GlmClient(served.address, timeout=5) as glm:
        yield glm


@pytest.fixture
async def aclient(served: Served, fake: FakeGlmService) -> AsyncIterator[AsyncGlmClient]:
    async with AsyncGlmClient(served.address, timeout=5) as glm:
        yield glm


def only_request(fake: FakeGlmService) -> pb.ChatRequest:
    assert len(fake.requests) == 1
    request = fake.requests[0]
    assert isinstance(request, pb.ChatRequest)
    return request


def contents(responses: list[pb.ChatResponse]) -> list[str]:
    return [response.choices[0].delta.content for response in responses]


# --- Conversion and plain values ------------------------------------------------------------


def test_messages_convert_from_pairs_dicts_protos_and_a_bare_string() -> None:
    converted = to_chat_messages(
        [
            ("system", "be brief"),
            {"role": "user", "content": "hi"},
            pb.ChatMessage(role="assistant", content="hello"),
            # Lists work too, as in decoded JSON, though the type says tuple.
            ["observation", "42"],  # type: ignore[list-item]
        ]
    )
    assert [(m.role, m.content) for m in converted] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("observation", "42"),
    ]
    assert [(m.role, m.content) for m in to_chat_messages("hi")] == [("user", "hi")]


@pytest.mark.parametrize(
    "bad",
    [
        ["hi"],  # a string turn would otherwise split into role "h", content "i"
        [("user", "a", "b")],
        [{"role": "user"}],
        [{"role": "user", "content": "x", "name": "bob"}],
        [42],
    ],
)
def test_malformed_messages_raise_type_error(bad: list[object]) -> None:
    with pytest.raises(TypeError):
        to_chat_messages(bad)  # type: ignore[arg-type]


def test_client_error_formats_and_pickles() -> None:
    error = GlmClientError(grpc.StatusCode.NOT_FOUND, "no such model")
    assert str(error) == "NOT_FOUND: no such model"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.message) == (grpc.StatusCode.NOT_FOUND, "no such model")
    # An RpcError that is not a Call (no code()) still converts, as UNKNOWN.
    bare = GlmClientError.from_rpc_error(grpc.RpcError("odd failure"))
    assert (bare.code, bare.message) == (grpc.StatusCode.UNKNOWN, "odd failure")


class FailedCall(grpc.RpcError):
    """A failed call as a channel reports it: a code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# What grpc reports for a stream Envoy cut after its reply began (the replica behind it died).
PROXY_CUT = "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"


def test_a_stream_cut_by_the_proxy_is_unavailable_and_keeps_grpcs_code() -> None:
    error = GlmClientError.from_rpc_error(FailedCall(grpc.StatusCode.INTERNAL, PROXY_CUT))
    assert (error.code, error.message) == (grpc.StatusCode.UNAVAILABLE, PROXY_CUT)
    assert error.grpc_code is grpc.StatusCode.INTERNAL
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.message, copy.grpc_code) == (
        grpc.StatusCode.UNAVAILABLE,
        PROXY_CUT,
        grpc.StatusCode.INTERNAL,
    )


@pytest.mark.parametrize(
    ("code", "details"),
    [
        # The server's own INTERNAL status (a bug), and resets with other HTTP/2 codes.
        (grpc.StatusCode.INTERNAL, "an incident id"),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 0"),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 1"),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 22"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received RST_STREAM with error code 11"),
        (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"),
    ],
)
def test_other_failures_keep_grpcs_code(code: grpc.StatusCode, details: str) -> None:
    error = GlmClientError.from_rpc_error(FailedCall(code, details))
    assert (error.code, error.grpc_code, error.message) == (code, code, details)


def test_accumulator_handles_cumulative_chunks_and_whole_messages() -> None:
    acc = ChatAccumulator(chunk=False)
    pieces = [
        acc.add(pb.ChatResponse(choices=[pb.ChatChoice(delta=pb.ChatDelta(content=text))]))
        for text in ("Hel", "Hello", "Hello!")
    ]
    assert pieces == ["Hel", "lo", "!"]
    assert acc.result().text == "Hello!"
    whole = ChatAccumulator()
    whole.add(
        pb.ChatResponse(
            id="x",
            model="m",
            choices=[pb.ChatChoice(message=pb.ChatMessage(content="All."), finish_reason="stop")],
            usage=pb.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        )
    )
    assert whole.result() == ChatResult("All.", "stop", TokenUsage(1, 2, 3), "m", "x")


# --- Sync client --------------------------------------------------------------------------


def test_chat_sends_only_the_optional_fields_given(client: GlmClient, fake: FakeGlmService) -> None:
    list(client.chat([("user", "hi")]))
    bare = only_request(fake)
    assert [f for f in CHAT_OPTIONAL_FIELDS if bare.HasField(f)] == []
    assert not bare.HasField("stream")
    # chunk is always sent: the client interprets content by it.
    assert bare.HasField("chunk")
    assert bare.chunk

    fake.reset()
    # Zeros are the interesting case: they must be sent, not dropped as falsy.
    list(
        client.chat(
            [("user", "hi")],
            model="m1",
            temperature=0.0,
            top_p=0.5,
            max_tokens=0,
            top_k=0,
            repetition_penalty=1.25,
            seed=0,
            stop="END",
            stop_token_ids=[2, 3],
        )
    )
    full = only_request(fake)
    assert [f for f in CHAT_OPTIONAL_FIELDS if full.HasField(f)] == list(CHAT_OPTIONAL_FIELDS)
    assert (full.temperature, full.top_p, full.max_tokens, full.top_k) == (0.0, 0.5, 0, 0)
    assert (full.repetition_penalty, full.seed, full.model) == (1.25, 0, "m1")
    assert list(full.stop) == ["END"]
    assert list(full.stop_token_ids) == [2, 3]


def test_chat_converts_messages(client: GlmClient, fake: FakeGlmService) -> None:
    list(client.chat([("system", "s"), {"role": "user", "content": "u"}]))
    assert [(m.role, m.content) for m in only_request(fake).messages] == [
        ("system", "s"),
        ("user", "u"),
    ]


def test_chat_streams_responses_in_order(client: GlmClient) -> None:
    responses = list(client.chat("hi", model="m7"))
    assert contents(responses) == [*PIECES, ""]
    assert [r.choices[0].finish_reason for r in responses] == ["", "", "", "stop"]
    assert responses[-1].usage.total_tokens == 10
    assert {r.model for r in responses} == {"m7"}


def test_chat_yields_each_chunk_before_the_next_is_produced(
    client: GlmClient, fake: FakeGlmService
) -> None:
    fake.gate = threading.Event()
    with client.chat("hi") as stream:
        # The fake holds its second chunk until the gate opens: a client that buffered the
        # stream would not return the first one here (and would fail on the deadline).
        assert next(stream).choices[0].delta.content == "Hel"
        fake.gate.set()
        assert contents(list(stream)) == [*PIECES[1:], ""]


def test_cancelling_a_stream_stops_the_server_and_ends_iteration(
    client: GlmClient, fake: FakeGlmService
) -> None:
    fake.gate = threading.Event()
    stream = client.chat("hi")
    assert next(stream).choices[0].delta.content == "Hel"
    stream.cancel()
    # The gate stays closed: the fake returns early only if it sees the call cancelled.
    assert fake.chat_finished.wait(5)
    assert fake.chat_cancelled is True
    assert list(stream) == []  # ends quietly instead of raising CANCELLED


@pytest.mark.parametrize("chunk", [True, False])
def test_chat_text_aggregates_the_stream(
    client: GlmClient, fake: FakeGlmService, chunk: bool
) -> None:
    result = client.chat_text([("user", "hi")], model="m2", chunk=chunk)
    assert result == ChatResult(
        text="Hello, world",
        finish_reason="stop",
        usage=TokenUsage(prompt_tokens=7, completion_tokens=3, total_tokens=10),
        model="m2",
        id="chat-1",
    )
    assert only_request(fake).chunk is chunk


def test_unary_errors_become_client_errors(client: GlmClient, fake: FakeGlmService) -> None:
    fake.fail = (grpc.StatusCode.INVALID_ARGUMENT, "prompt must not be empty")
    for call in (
        lambda: client.embed([""]),
        lambda: client.tokenize(""),
        lambda: client.list_models(),
    ):
        with pytest.raises(GlmClientError) as caught:
            call()
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.message == "prompt must not be empty"
        assert isinstance(caught.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize("fail_after_chunks", [None, 2])
def test_stream_errors_become_client_errors(
    client: GlmClient, fake: FakeGlmService, fail_after_chunks: int | None
) -> None:
    fake.fail = (grpc.StatusCode.INVALID_ARGUMENT, "last message must come from user")
    fake.fail_after_chunks = fail_after_chunks
    received: list[pb.ChatResponse] = []
    with pytest.raises(GlmClientError) as caught:
        received.extend(client.chat([("assistant", "x")]))
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == "last message must come from user"
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    assert contents(received) == list(PIECES[: fail_after_chunks or 0])
    with pytest.raises(GlmClientError):
        client.chat_text("hi")


def test_metadata_is_sent_with_every_call(served: Served, fake: FakeGlmService) -> None:
    with GlmClient(served.address, metadata={"Authorization": "Bearer t0k"}) as glm:
        glm.chat_text("hi")
        glm.embed("x")
        glm.tokenize("x")
        glm.list_models()
    assert len(fake.metadata) == 4
    # Keys are lowercased: gRPC rejects uppercase metadata keys.
    assert all(m.get("authorization") == "Bearer t0k" for m in fake.metadata)


def test_embed_and_vectors_in_prompt_order(client: GlmClient, fake: FakeGlmService) -> None:
    response = client.embed(["ab", "abcde"], model="e1", normalize=True)
    request = fake.requests[0]
    assert isinstance(request, pb.EmbedRequest)
    assert (list(request.prompt), request.model, request.normalize) == (["ab", "abcde"], "e1", True)
    assert (response.model, response.dimensions) == ("e1", 3)
    vectors = client.embed_vectors("one prompt")
    assert list(fake.requests[1].prompt) == ["one prompt"]  # type: ignore[attr-defined]
    assert vectors == [[0.0, pytest.approx(0.1), 10.0]]
    assert client.embed_vectors(["ab", "abcde"]) == [
        [0.0, pytest.approx(0.1), 2.0],
        [1.0, pytest.approx(0.1), 5.0],
    ]


def test_tokenize_sets_max_tokens_only_when_given(client: GlmClient, fake: FakeGlmService) -> None:
    full = client.tokenize("hello", model="t1")
    cut = client.tokenize("hello", max_tokens=0)
    first, second = fake.requests
    assert isinstance(first, pb.TokenizeRequest)
    assert isinstance(second, pb.TokenizeRequest)
    assert not first.HasField("max_tokens")
    assert first.model == "t1"
    assert second.HasField("max_tokens")
    assert second.max_tokens == 0
    assert (list(full.tokens), full.truncated) == (list("hello"), False)
    assert (list(cut.token_ids), cut.truncated) == ([], True)


def test_list_models(client: GlmClient) -> None:
    response = client.list_models()
    assert [m.id for m in response.data] == ["fake-chat", "fake-embed"]
    assert response.max_message_bytes == 16 << 20


def test_health_reports_status_names(client: GlmClient, served: Served) -> None:
    assert client.health() == "SERVING"
    served.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert client.health(SERVICE) == "NOT_SERVING"
    with pytest.raises(GlmClientError) as caught:
        client.health("no.such.Service")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def test_wait_until_ready_waits_for_serving(client: GlmClient, served: Served) -> None:
    served.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    timer = threading.Timer(
        0.3, served.health.set, (SERVICE, health_pb2.HealthCheckResponse.SERVING)
    )
    started = time.monotonic()
    timer.start()
    try:
        client.wait_until_ready(5, service=SERVICE, interval=0.05)
    finally:
        timer.cancel()
    assert 0.25 <= time.monotonic() - started < 4


def test_wait_until_ready_times_out_with_the_last_status(client: GlmClient, served: Served) -> None:
    served.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(GlmClientError) as caught:
        client.wait_until_ready(0.3, service=SERVICE, interval=0.05)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "NOT_SERVING" in caught.value.message


def test_wait_until_ready_gives_up_on_an_unreachable_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now; the checks wait for a connection until the deadline.
    with GlmClient(f"127.0.0.1:{port}") as glm:
        started = time.monotonic()
        with pytest.raises(GlmClientError) as caught:
            glm.wait_until_ready(0.3)
        assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2


def test_wait_until_ready_fails_fast_without_a_health_service() -> None:
    bare = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        with GlmClient(f"127.0.0.1:{port}") as glm:
            started = time.monotonic()
            with pytest.raises(GlmClientError) as caught:
                glm.wait_until_ready(5)
            assert caught.value.code is grpc.StatusCode.UNIMPLEMENTED
            assert time.monotonic() - started < 2
    finally:
        bare.stop(grace=None)


@pytest.mark.parametrize("where", ["client", "call"])
def test_timeouts_become_deadlines(served: Served, fake: FakeGlmService, where: str) -> None:
    fake.gate = threading.Event()
    try:
        with GlmClient(served.address, timeout=0.3 if where == "client" else 30) as glm:
            with pytest.raises(GlmClientError) as caught:
                glm.chat_text("hi", timeout=0.3 if where == "call" else None)
            assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        fake.gate.set()


def test_default_receive_limit_allows_large_responses(
    client: GlmClient, fake: FakeGlmService
) -> None:
    fake.embed_dims = 1_400_000  # about 5.6 MB on the wire: over gRPC's default 4 MiB
    assert client.embed("big").dimensions == 1_400_000


def test_message_size_limits_are_configurable(served: Served, fake: FakeGlmService) -> None:
    fake.embed_dims = 1_000
    with GlmClient(served.address, max_receive_message_bytes=1024) as glm:
        with pytest.raises(GlmClientError) as caught:
            glm.embed("x")
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    with GlmClient(served.address, max_send_message_bytes=1024) as glm:
        with pytest.raises(GlmClientError) as caught:
            glm.embed("x" * 2048)
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert glm.embed("x").dimensions == 1_000


def test_an_existing_channel_is_used_and_left_open(served: Served, fake: FakeGlmService) -> None:
    channel = grpc.insecure_channel(served.address)
    try:
        with GlmClient(channel) as glm:
            assert glm.channel is channel
            assert glm.tokenize("ab").model == "fake-chat"
        # Still usable: the client closed only what it did not own, i.e. nothing.
        assert GlmClient(channel).list_models().object == "list"
        with pytest.raises(ValueError, match="channel"):
            GlmClient(channel, max_receive_message_bytes=1)
    finally:
        channel.close()


def test_default_target_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLM_GRPC_ADDRESS", "10.1.2.3:6000")
    with GlmClient() as glm:
        assert glm.target == "10.1.2.3:6000"
    monkeypatch.delenv("GLM_GRPC_ADDRESS")
    with GlmClient() as glm:
        assert glm.target == "127.0.0.1:50051"


# --- Async client -------------------------------------------------------------------------


async def test_async_chat_streams_in_order_with_given_fields_only(
    aclient: AsyncGlmClient, fake: FakeGlmService
) -> None:
    responses = [r async for r in aclient.chat([{"role": "user", "content": "hi"}], seed=0)]
    assert contents(responses) == [*PIECES, ""]
    request = only_request(fake)
    assert [f for f in CHAT_OPTIONAL_FIELDS if request.HasField(f)] == ["seed"]
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]


@pytest.mark.parametrize("chunk", [True, False])
async def test_async_chat_text_aggregates(aclient: AsyncGlmClient, chunk: bool) -> None:
    result = await aclient.chat_text("hi", chunk=chunk)
    assert result == ChatResult("Hello, world", "stop", TokenUsage(7, 3, 10), "fake-chat", "chat-1")


@pytest.mark.parametrize("fail_after_chunks", [None, 1])
async def test_async_stream_errors_become_client_errors(
    aclient: AsyncGlmClient, fake: FakeGlmService, fail_after_chunks: int | None
) -> None:
    fake.fail = (grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    fake.fail_after_chunks = fail_after_chunks
    received: list[pb.ChatResponse] = []

    async def consume() -> None:
        async for response in aclient.chat("hi"):
            received.append(response)

    with pytest.raises(GlmClientError) as caught:
        await consume()
    assert (caught.value.code, caught.value.message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad request",
    )
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    assert contents(received) == list(PIECES[: fail_after_chunks or 0])


async def test_async_unary_errors_become_client_errors(
    aclient: AsyncGlmClient, fake: FakeGlmService
) -> None:
    fake.fail = (grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    for call in (aclient.embed("x"), aclient.tokenize("x"), aclient.list_models()):
        with pytest.raises(GlmClientError) as caught:
            await call
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert isinstance(caught.value.__cause__, grpc.RpcError)


async def test_async_cancel_stops_the_server(aclient: AsyncGlmClient, fake: FakeGlmService) -> None:
    fake.gate = threading.Event()
    async with aclient.chat("hi") as stream:
        first = await anext(stream)
        assert first.choices[0].delta.content == "Hel"
    assert await asyncio.to_thread(fake.chat_finished.wait, 5)
    assert fake.chat_cancelled is True
    assert [r async for r in stream] == []


async def test_async_unary_calls_and_metadata(served: Served, fake: FakeGlmService) -> None:
    async with AsyncGlmClient(served.address, metadata=[("x-api-key", "k1")]) as glm:
        assert await glm.embed_vectors(["ab", "abcde"]) == [
            [0.0, pytest.approx(0.1), 2.0],
            [1.0, pytest.approx(0.1), 5.0],
        ]
        token_request_response = await glm.tokenize("hey", max_tokens=2)
        assert list(token_request_response.token_ids) == [ord("h"), ord("e")]
        assert [m.id for m in (await glm.list_models()).data] == ["fake-chat", "fake-embed"]
        assert await glm.health(SERVICE) == "SERVING"
    tokenize_request = fake.requests[1]
    assert isinstance(tokenize_request, pb.TokenizeRequest)
    assert tokenize_request.HasField("max_tokens")
    assert all(m.get("x-api-key") == "k1" for m in fake.metadata)
    assert len(fake.metadata) == 3  # health goes to the health service, not the fake


async def test_async_wait_until_ready(aclient: AsyncGlmClient, served: Served) -> None:
    served.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(GlmClientError) as caught:
        await aclient.wait_until_ready(0.2, interval=0.05)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, served.health.set, "", health_pb2.HealthCheckResponse.SERVING)
    await aclient.wait_until_ready(5, interval=0.05)
    assert await aclient.health() == "SERVING"


# --- CLI ----------------------------------------------------------------------------------


class RecordingStdout:
    """Stands in for sys.stdout and records the order of writes and flushes."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def write(self, text: str) -> int:
        self.events.append(f"write:{text}")
        return len(text)

    def flush(self) -> None:
        self.events.append("flush")


def test_cli_chat_streams_and_reports_usage(
    served: Served, fake: FakeGlmService, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--target",
            served.address,
            "--metadata",
            "authorization=Bearer abc",
            "chat",
            "hi there",
            "--system",
            "be brief",
            "--model",
            "m3",
            "--temperature",
            "0",
            "--max-tokens",
            "5",
            "--stop",
            "a",
            "b",
            "--seed",
            "3",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "Hello, world\n"
    assert "finish_reason=stop" in err
    assert "prompt_tokens=7 completion_tokens=3 total_tokens=10" in err
    request = only_request(fake)
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "be brief"),
        ("user", "hi there"),
    ]
    assert (request.model, request.temperature, request.max_tokens, request.seed) == (
        "m3",
        0.0,
        5,
        3,
    )
    assert request.HasField("temperature")
    assert not request.HasField("top_p")
    assert list(request.stop) == ["a", "b"]
    assert fake.metadata[0]["authorization"] == "Bearer abc"


def test_cli_chat_flushes_each_piece(
    served: Served, fake: FakeGlmService, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert main(["--target", served.address, "chat", "hi"]) == 0
    expected = [event for piece in [*PIECES, "\n"] for event in (f"write:{piece}", "flush")]
    assert recorder.events == expected


def test_cli_chat_error_mid_stream(
    served: Served, fake: FakeGlmService, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    fake.fail_after_chunks = 1
    assert main(["--target", served.address, "chat", "hi"]) == 1
    out, err = capsys.readouterr()
    assert out == "Hel\n"
    assert err == "error: RESOURCE_EXHAUSTED: queue full\n"


def test_cli_embed_prints_json(
    served: Served, fake: FakeGlmService, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--target", served.address, "embed", "ab", "abcde", "--model", "e2", "--normalize"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    # Float32 values print as their shortest form (0.1, not 0.10000000149011612).
    assert printed == {
        "model": "e2",
        "dimensions": 3,
        "vectors": [[0.0, 0.1, 2.0], [1.0, 0.1, 5.0]],
    }
    request = fake.requests[0]
    assert isinstance(request, pb.EmbedRequest)
    assert request.normalize


def test_cli_tokenize_prints_json(
    served: Served, fake: FakeGlmService, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", served.address, "tokenize", "héllo", "--max-tokens", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "model": "fake-chat",
        "token_ids": [ord("h"), ord("é")],
        "tokens": list("héllo"),
        "truncated": True,
    }


def test_cli_models_prints_a_table(
    served: Served, fake: FakeGlmService, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", served.address, "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " ".join(lines[0].split()) == "id object ready default dims max input context"
    assert lines[1].split() == ["fake-chat", "chat.completion", "yes", "yes", "-", "2048", "8192"]
    assert lines[2].split() == ["fake-embed", "embedding", "no", "no", "384", "256", "512"]
    assert len({len(line) for line in lines}) == 1  # right-aligned numbers end together


def test_cli_health(
    served: Served, fake: FakeGlmService, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", served.address, "health"]) == 0
    served.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["--target", served.address, "health", "--service", SERVICE]) == 1
    assert capsys.readouterr().out == "SERVING\nNOT_SERVING\n"


def test_cli_target_defaults_to_the_environment(
    served: Served,
    fake: FakeGlmService,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GLM_GRPC_ADDRESS", served.address)
    assert main(["tokenize", "x"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ["x"]


def test_cli_server_error_prints_code_and_exits_1(
    served: Served, fake: FakeGlmService, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail = (grpc.StatusCode.INVALID_ARGUMENT, "unknown model 'nope'")
    assert main(["--target", served.address, "embed", "x", "--model", "nope"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: INVALID_ARGUMENT: unknown model 'nope'\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["chat"],
        ["--timeout", "-1", "models"],
        ["chat", "hi", "--seed", "-1"],
        ["--metadata", "novalue", "models"],
        ["frobnicate"],
        [],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err
