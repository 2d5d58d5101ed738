"""glm.v1.GlmService: turns RPCs into engine calls and engine results into responses.

The work is done by transport-free methods (chat, embed, tokenize, list_models) that take and
return protobuf messages; the RPC handlers and the JSON gateway (server/service/http_gateway.py)
both call them, so every route runs one pipeline. Errors are raised as server.errors exceptions;
the transport maps them to statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
import numpy as np

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.engine.registry import ModelRegistry
from server.metrics import current_call
from server.service import convert


class GlmService(pb_grpc.GlmServiceServicer):
    """The glm.v1.GlmService implementation over a ModelRegistry."""

    def __init__(self, registry: ModelRegistry, max_message_bytes: int) -> None:
        self._registry = registry
        self._max_message_bytes = max_message_bytes

    # -- the pipeline, free of any transport ------------------------------------------------

    async def chat(
        self,
        request: pb.ChatRequest,
        on_accepted: Callable[[], None] | None = None,
        *,
        prompt: str | None = None,
        cap_max_tokens: bool = False,
    ) -> AsyncGenerator[pb.ChatResponse, None]:
        """Stream the reply to `request` (one response only when request.stream is false).

        `on_accepted` is called once the request is valid and waits for its place in the engine
        (ChatEngine.generate). The JSON routes also use two options the typed API does not
        have: `prompt`, a text continued without the chat template (OpenAI's completions; the
        request then holds no messages), and `cap_max_tokens`, which makes a max_tokens beyond
        the model's limits cap the reply instead of being refused (the legacy routes).
        """
        model_id, engine = self._registry.chat(request.model)
        call = current_call()  # what the request log line and the metrics report
        call.note_model(model_id)
        limit = self._registry.spec(model_id).max_input_chars
        chars = convert.chat_chars(request) + len(prompt or "")
        convert.check_input_chars(chars, limit, model_id, "the request")
        chat_request = convert.chat_request_from_proto(
            request, model_id, prompt=prompt, cap_max_tokens=cap_max_tokens
        )
        stream = request.stream if request.HasField("stream") else True
        deltas_only = request.chunk if request.HasField("chunk") else True
        call_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        text = ""
        first = True
        async with contextlib.aclosing(engine.generate(chat_request, on_accepted)) as events:
            async for event in events:
                text += event.text
                if event.finish_reason is None and not event.text:
                    continue
                call.note_first_token()
                if event.usage is not None:
                    call.note_usage(event.usage.prompt_tokens, event.usage.completion_tokens)
                if not stream:
                    if event.finish_reason is not None and event.usage is not None:
                        yield convert.chat_completion(
                            call_id=call_id,
                            created=created,
                            model=model_id,
                            content=text,
                            finish_reason=event.finish_reason,
                            usage=event.usage,
                            function_call=event.function_call,
                        )
                    continue
                yield convert.chat_chunk(
                    call_id=call_id,
                    created=created,
                    model=model_id,
                    content=event.text if deltas_only else text,
                    first=first,
                    finish_reason=event.finish_reason,
                    usage=event.usage,
                    function_call=event.function_call,
                )
                first = False

    async def embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        """The vectors of request.prompt, in order."""
        model_id, batcher, model = self._registry.embedder(request.model)
        call = current_call()
        call.note_model(model_id)
        spec = self._registry.spec(model_id)
        texts = convert.embed_texts_from_proto(
            request, model_id, spec.max_batch_prompts, spec.max_input_chars
        )
        vectors, tokens = await batcher.embed(texts)
        call.note_usage(tokens)
        if request.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return pb.EmbedResponse(
            data=[pb.Embedding(values=row.tolist(), index=i) for i, row in enumerate(vectors)],
            model=model_id,
            object="embedding",
            usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
            dimensions=model.dimensions,
        )

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """The tokens of request.prompt under a model's tokenizer."""
        max_tokens = convert.tokenize_max_tokens(request)
        model_id, model = self._registry.any_model(request.model)
        current_call().note_model(model_id)
        limit = self._registry.spec(model_id).max_input_chars
        convert.check_input_chars(len(request.prompt), limit, model_id, "prompt")
        result = await asyncio.to_thread(model.tokenize, request.prompt, max_tokens)
        return pb.TokenizeResponse(
            token_ids=result.token_ids,
            tokens=result.tokens,
            model=model_id,
            object="tokenizer",
            truncated=result.truncated,
        )

    async def list_models(self) -> pb.ListModelsResponse:
        """Every configured model with its limits and readiness."""
        return pb.ListModelsResponse(
            object="list",
            data=[convert.model_to_proto(info) for info in self._registry.infos()],
            max_message_bytes=self._max_message_bytes,
        )

    # -- gRPC handlers -----------------------------------------------------------------------

    async def Chat(
        self,
        request: pb.ChatRequest,
        context: grpc.aio.ServicerContext[pb.ChatRequest, pb.ChatResponse],
    ) -> AsyncIterator[pb.ChatResponse]:
        async with contextlib.aclosing(self.chat(request)) as responses:
            async for response in responses:
                yield response

    async def Embed(
        self,
        request: pb.EmbedRequest,
        context: grpc.aio.ServicerContext[pb.EmbedRequest, pb.EmbedResponse],
    ) -> pb.EmbedResponse:
        return await self.embed(request)

    async def Tokenize(
        self,
        request: pb.TokenizeRequest,
        context: grpc.aio.ServicerContext[pb.TokenizeRequest, pb.TokenizeResponse],
    ) -> pb.TokenizeResponse:
        return await self.tokenize(request)

    async def ListModels(
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        return await self.list_models()
