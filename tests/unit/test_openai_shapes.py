"""The /v1 and legacy renderings of a tool call, read back by the official openai SDK's own parsing.

The replies are rendered by the JSON dialects from typed responses as the service produces them
(a role chunk, then the call with its finish_reason), and served to the SDK by an httpx mock
transport: what is under test is the bytes and how the SDK reads them, not a model (a small
ChatGLM3 cannot be made to call a tool on demand).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from glm.v1 import glm_service_pb2 as pb
from server.service.json_api import legacy
from server.service.json_api import openai as openai_api
from server.service.json_api.common import OPENAI_SSE

CALL = pb.FunctionCall(name="get_weather", arguments='{"city": "北京", "days": 2}')
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def responses(stream: bool) -> list[pb.ChatResponse]:
    """What GlmService yields for a reply that is one tool call."""
    base = {"id": "chatcmpl-0123456789abcdef0123456789abcdef", "model": "m", "created": 1}
    usage = pb.Usage(prompt_tokens=30, completion_tokens=12, total_tokens=42)
    if not stream:
        whole = pb.ChatResponse(object="chat.completion", usage=usage, **base)
        choice = whole.choices.add(index=0, finish_reason="function_call")
        choice.message.role = "assistant"
        choice.message.function_call.CopyFrom(CALL)
        return [whole]
    first = pb.ChatResponse(object="chat.completion.chunk", **base)
    first.choices.add(index=0).delta.role = "assistant"
    last = pb.ChatResponse(object="chat.completion.chunk", usage=usage, **base)
    last.choices.add(index=0, finish_reason="function_call").delta.function_call.CopyFrom(CALL)
    return [first, last]


def sdk(stream: bool, include_usage: bool = False) -> openai.OpenAI:
    def handle(request: httpx.Request) -> httpx.Response:
        if not stream:
            body = json.dumps(openai_api.chat_completion(responses(False)[0])).encode()
            return httpx.Response(200, headers={"content-type": "application/json"}, content=body)
        events = openai_api.ChatStream(include_usage)
        data = b"".join(b"".join(events.events(r)) for r in responses(True)) + OPENAI_SSE.done
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)

    http = httpx.Client(transport=httpx.MockTransport(handle))
    return openai.OpenAI(base_url="http://glm/v1", api_key="unused", http_client=http)


def test_a_whole_reply_s_tool_call_as_the_sdk_reads_it() -> None:
    completion = sdk(stream=False).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert isinstance(call.function.arguments, str)  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "北京", "days": 2}  # type: ignore[union-attr]


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_tool_call_as_the_sdk_accumulates_it(include_usage: bool) -> None:
    client = sdk(stream=True, include_usage=include_usage)
    options: Any = {"include_usage": True} if include_usage else openai.omit
    with client.chat.completions.stream(
        model="m",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,
        stream_options=options,
    ) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "北京", "days": 2}  # type: ignore[union-attr]
    # The id is the same as the whole reply's, and the call has index 0 in its chunk.
    whole = openai_api.chat_completion(responses(False)[0])
    assert call.id == whole["choices"][0]["message"]["tool_calls"][0]["id"]
    with_call = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert [c.choices[0].delta.tool_calls[0].index for c in with_call] == [0]  # type: ignore[index]
    # The finish chunk carries nothing else, and usage comes only when asked, once.
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    assert finish[0].choices[0].delta.tool_calls is None
    usages = [c.usage for c in chunks if c.usage is not None]
    assert usages == ([final.usage] if include_usage else [])
    if include_usage:
        assert chunks[-1].choices == []


def legacy_call(return_function_call: bool) -> legacy.LegacyChat:
    body = {
        "messages": [
            {"role": "system", "content": "Answer.", "tools": [TOOLS[0]["function"]]},
            {"role": "user", "content": "Weather in Beijing?"},
        ],
        "return_function_call": return_function_call,
        "some_other_key": 1,
    }
    return legacy.chat_request(json.dumps(body).encode())


def test_the_legacy_return_function_call() -> None:
    parsed = legacy_call(return_function_call=True)
    assert [t.function.name for t in parsed.request.tools] == ["get_weather"]
    whole = legacy.chat_completion(responses(False)[0], parsed)
    choice = whole["choices"][0]
    # The legacy shape: the content is the call as JSON, history the conversation to send back.
    assert json.loads(choice["message"]["content"]) == {
        "name": "get_weather",
        "parameters": {"city": "北京", "days": 2},
    }
    history = choice["history"]
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[0]["tools"][0]["name"] == "get_weather"
    assert history[-1]["metadata"] == "get_weather"
    assert "tool_call(" in history[-1]["content"]
    assert choice["message"]["metadata"] is None
    assert choice["message"]["tools"] is None


def test_without_return_function_call_the_reply_is_chatglm3_s_text() -> None:
    whole = legacy.chat_completion(responses(False)[0], legacy_call(return_function_call=False))
    choice = whole["choices"][0]
    assert choice["history"] is None
    assert choice["message"]["content"].startswith("get_weather\n")
    assert choice["message"]["function_call"]["name"] == "get_weather"
