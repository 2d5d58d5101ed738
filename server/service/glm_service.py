"""glm.v1.GlmService: turns RPCs into engine calls and engine results into responses.

Errors are raised as server.errors exceptions; the transport's interceptor maps them to statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from server.engine.registry import ModelRegistry
from server.service import convert


class GlmService(pb_grpc.GlmServiceServicer):
    """The glm.v1.GlmService implementation over a ModelRegistry."""

    def __init__(self, registry: ModelRegistry, max_message_bytes: int) -> None:
        self._registry = registry
        self._max_message_bytes = max_message_bytes

    async def Chat(
        self,
        request: pb.ChatRequest,
        context: grpc.aio.ServicerContext[pb.ChatRequest, pb.ChatResponse],
    ) -> AsyncIterator[pb.ChatResponse]:
        model_id, engine = self._registry.chat(request.model)
        chat_request = convert.chat_request_from_proto(request, model_id)
        stream = request.stream if request.HasField("stream") else True
        deltas_only = request.chunk if request.HasField("chunk") else True
        call_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        text = ""
        first = True
        async with contextlib.aclosing(engine.generate(chat_request)) as events:
            async for event in events:
                text += event.text
                if event.finish_reason is None and not event.text:
                    continue
                if not stream:
                    if event.finish_reason is not None and event.usage is not None:
                        yield convert.chat_completion(
                            call_id=call_id,
                            created=created,
                            model=model_id,
                            content=text,
                            finish_reason=event.finish_reason,
                            usage=event.usage,
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
                )
                first = False

    async def Embed(
        self,
        request: pb.EmbedRequest,
        context: grpc.aio.ServicerContext[pb.EmbedRequest, pb.EmbedResponse],
    ) -> pb.EmbedResponse:
        model_id, batcher, model = self._registry.embedder(request.model)
        texts = convert.embed_texts_from_proto(
            request, self._registry.spec(model_id).max_batch_prompts
        )
        vectors, tokens = await batcher.embed(texts)
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

    async def Tokenize(
        self,
        request: pb.TokenizeRequest,
        context: grpc.aio.ServicerContext[pb.TokenizeRequest, pb.TokenizeResponse],
    ) -> pb.TokenizeResponse:
        max_tokens = convert.tokenize_max_tokens(request)
        model_id, model = self._registry.any_model(request.model)
        result = await asyncio.to_thread(model.tokenize, request.prompt, max_tokens)
        return pb.TokenizeResponse(
            token_ids=result.token_ids,
            tokens=result.tokens,
            model=model_id,
            object="tokenizer",
            truncated=result.truncated,
        )

    async def ListModels(
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            object="list",
            data=[convert.model_to_proto(info) for info in self._registry.infos()],
            max_message_bytes=self._max_message_bytes,
        )
