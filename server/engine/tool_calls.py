"""Tool-call detection on a stream of generated text.

A model with a tool format (ChatGLM3) answers a tool call as `NAME\\n` + a call block. While the
reply's first line could still be the name of an offered tool, its text is held back; once the
first line is known not to be one, the text streams as usual. A reply whose first line names a tool
is held to the end and parsed: a valid call becomes one final event with `function_call` set and
finish_reason FUNCTION_CALL, anything else is released as plain text.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

from server.domain import FinishReason, FunctionCall, GenerationEvent, ToolSpec

ToolCallParser = Callable[[str, Sequence[ToolSpec]], FunctionCall | None]


def _could_still_name_a_tool(head: str, names: frozenset[str]) -> bool:
    stripped = head.lstrip()
    return any(name.startswith(stripped) for name in names)


async def detect_tool_calls(
    events: AsyncIterator[GenerationEvent],
    tools: Sequence[ToolSpec],
    parse: ToolCallParser,
) -> AsyncGenerator[GenerationEvent, None]:
    """Pass `events` through, turning a reply that is a tool call into a function_call event."""
    names = frozenset(t.name for t in tools)
    held = ""
    plain = not names  # decided: the reply is plain text, stream it
    tool_call = False  # decided: the first line names a tool, hold everything
    async for event in events:
        if plain:
            yield event
            continue
        held += event.text
        if event.finish_reason is not None:
            call = parse(held, tools) if tool_call or held.strip() in names else None
            if call is not None:
                yield GenerationEvent(
                    "", FinishReason.FUNCTION_CALL, event.usage, function_call=call
                )
            else:
                yield GenerationEvent(held, event.finish_reason, event.usage)
            return
        if tool_call:
            continue
        first_line, newline, _ = held.partition("\n")
        if newline and first_line.strip() in names:
            tool_call = True
        elif newline or not _could_still_name_a_tool(first_line, names):
            plain = True
            yield GenerationEvent(held)
            held = ""
