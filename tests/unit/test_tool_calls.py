"""Tool-call detection over scripted event streams (the model is not under test here)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import pytest

from server.domain import FinishReason, FunctionCall, GenerationEvent, ToolSpec, Usage
from server.engine.tool_calls import detect_tool_calls
from server.models.chatglm3.tools import try_parse_tool_call

TOOLS = (ToolSpec("get_weather", "Weather of a city", {"type": "object"}), ToolSpec("get_time"))
USAGE = Usage(prompt_tokens=10, completion_tokens=5)


def chatglm3_parser(text: str, tools: Sequence[ToolSpec]) -> FunctionCall | None:
    """ChatGLM3's real parser, as ChatGLM3Model offers it."""
    call = try_parse_tool_call(text, [t.name for t in tools])
    return None if call is None else FunctionCall(call.name, call.arguments_json)


async def scripted(pieces: list[str]) -> AsyncIterator[GenerationEvent]:
    for piece in pieces[:-1]:
        yield GenerationEvent(piece)
    yield GenerationEvent(pieces[-1], FinishReason.STOP, USAGE)


async def run(pieces: list[str], tools: Sequence[ToolSpec] = TOOLS) -> list[GenerationEvent]:
    return [e async for e in detect_tool_calls(scripted(pieces), tools, chatglm3_parser)]


async def test_a_tool_call_becomes_a_function_call_event() -> None:
    reply = ["get_", "weather\n", "```python\n", "tool_call(city='北京', days=2)\n", "```"]
    events = await run(reply)
    assert len(events) == 1
    [last] = events
    assert last.finish_reason is FinishReason.FUNCTION_CALL
    assert last.text == ""
    assert last.usage == USAGE
    assert last.function_call is not None
    assert last.function_call.name == "get_weather"
    assert json.loads(last.function_call.arguments) == {"city": "北京", "days": 2}


async def test_plain_text_streams_once_it_cannot_be_a_tool_name() -> None:
    events = await run(["get", " ready", ", set,", " go"])
    # "get" could start "get_weather": held; "get ready" cannot: released, then streamed.
    assert [e.text for e in events] == ["get ready", ", set,", " go"]
    assert events[-1].finish_reason is FinishReason.STOP
    assert all(e.function_call is None for e in events)


async def test_a_tool_name_followed_by_an_invalid_call_is_plain_text() -> None:
    events = await run(["get_weather\n", "```python\n", "tool_call(__import__('os'))\n", "```"])
    assert len(events) == 1
    assert events[0].finish_reason is FinishReason.STOP
    assert events[0].text.startswith("get_weather\n")
    assert events[0].function_call is None


async def test_an_unknown_tool_is_plain_text() -> None:
    events = await run(["delete_files\n", "```python\n", "tool_call()\n", "```"])
    assert "".join(e.text for e in events).startswith("delete_files\n")
    assert events[-1].finish_reason is FinishReason.STOP


@pytest.mark.parametrize("pieces", [["Hello", " world"], ["get_time"]])
async def test_without_tools_nothing_is_held(pieces: list[str]) -> None:
    events = await run(pieces, tools=())
    assert [e.text for e in events] == pieces
