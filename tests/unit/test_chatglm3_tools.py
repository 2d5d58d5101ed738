"""ChatGLM3 tool-call parsing: valid calls, malformed replies, hostile code that must never run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.models.chatglm3.tools import (
    MAX_TOOL_CALL_CHARS,
    ToolCall,
    ToolCallError,
    format_tool_call,
    parse_tool_call,
    tool_names,
    try_parse_tool_call,
    unwrap_tools,
)


def reply(code: str, name: str = "get_weather") -> str:
    return f"{name}\n```python\n{code}\n```"


def test_parses_a_tool_call_into_name_and_json_arguments() -> None:
    call = parse_tool_call(reply('tool_call(location="北京", days=3, metric=True, extra=None)'))
    assert call == ToolCall(
        "get_weather", {"location": "北京", "days": 3, "metric": True, "extra": None}
    )
    assert json.loads(call.arguments_json) == {
        "location": "北京",
        "days": 3,
        "metric": True,
        "extra": None,
    }
    assert "北京" in call.arguments_json  # non-ASCII kept, as ChatGLM3's JSON is


def test_containers_negative_numbers_and_tuples_become_json() -> None:
    call = parse_tool_call(reply("tool_call(a=[1, -2.5, 'x'], b={'k': (1, 2)}, c=-7)"))
    assert call.arguments == {"a": [1, -2.5, "x"], "b": {"k": [1, 2]}, "c": -7}


def test_no_arguments_and_surrounding_whitespace() -> None:
    assert parse_tool_call("  random_number \n```python\ntool_call()\n```\n") == ToolCall(
        "random_number", {}
    )


def test_block_without_language_tag_is_accepted() -> None:
    assert parse_tool_call("f\n```\ntool_call(x=1)\n```").arguments == {"x": 1}


def test_allowed_names_restrict_the_tool() -> None:
    text = reply("tool_call(x=1)", name="delete_everything")
    with pytest.raises(ToolCallError, match="not offered"):
        parse_tool_call(text, allowed_names={"get_weather"})
    assert parse_tool_call(text, allowed_names={"delete_everything"}).name == "delete_everything"


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Beijing is sunny.",
        "get_weather",
        "get_weather\ntool_call(x=1)",  # no code block
        "get weather\n```python\ntool_call(x=1)\n```",  # a name with a space
        reply("tool_call(x=1"),  # syntax error
        reply("tool_call(1, 2)"),  # positional arguments
        reply("tool_call(x=1)\ntool_call(y=2)"),  # two statements
        reply("tool_call(x=1, x=2)"),  # duplicate keyword
        reply("tool_call(x=float('nan'))"),
        reply("tool_call(x=1e999)"),  # inf has no JSON form
        reply("tool_call(x={1, 2})"),  # a set
        reply("tool_call(x=b'raw')"),  # bytes
        reply("tool_call(x=1j)"),  # complex
        reply("tool_call(x={1: 'a'})"),  # non-string key
        reply("other_call(x=1)"),
        reply("x = 1"),
        "",
    ],
)
def test_malformed_replies_are_refused(text: str) -> None:
    with pytest.raises(ToolCallError):
        parse_tool_call(text)
    assert try_parse_tool_call(text) is None


@pytest.mark.parametrize(
    "code",
    [
        "__import__('pathlib').Path(MARKER).touch()",
        "tool_call(x=__import__('pathlib').Path(MARKER).touch())",
        "tool_call(x=open(MARKER, 'w'))",
        "tool_call(x=(lambda: __import__('os'))())",
        "tool_call(x=tool_call(y=1))",  # nested call
        "tool_call(x=().__class__.__base__.__subclasses__())",  # attribute walk
        "tool_call.__globals__",
        "tool_call(**{'x': 1})",
        "tool_call(*[1])",
        "tool_call(x=[i for i in range(10)])",
        "tool_call(x=os)",  # a name, not a literal
        "tool_call(x=f'{MARKER}')",
        "tool_call(x=1 + 1)",
        "tool_call(x=1)(y=2)",  # calling the result
        "getattr(tool_call, 'x')(x=1)",
        "tool_call(x=9 ** 9 ** 9)",
    ],
)
def test_hostile_code_is_refused_and_never_runs(code: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ToolCallError):
        parse_tool_call(reply(code.replace("MARKER", repr(str(marker)))))
    assert not marker.exists()


def test_pathological_inputs_are_refused_quickly() -> None:
    with pytest.raises(ToolCallError, match="longer than"):
        parse_tool_call(reply("tool_call(x='" + "a" * MAX_TOOL_CALL_CHARS + "')"))
    with pytest.raises(ToolCallError):
        parse_tool_call(reply("tool_call(x=" + "[" * 200 + "]" * 200 + ")"))
    with pytest.raises(ToolCallError):
        parse_tool_call(reply("tool_call(x=" + "9" * 5000 + ")"))  # past int's digit limit


def test_format_round_trips_through_parse() -> None:
    arguments = {"city": "上海", "n": 2, "ok": False, "none": None, "tags": ["a", "b"], "f": 0.5}
    name, content = format_tool_call("lookup", arguments)
    assert name == "lookup"
    assert content.startswith("```python\ntool_call(")
    assert content.endswith(")\n```")
    assert parse_tool_call(f"{name}\n{content}") == ToolCall("lookup", arguments)


@pytest.mark.parametrize(
    ("name", "arguments"),
    [("bad name", {}), ("f", {"not-ident": 1}), ("f", {"class": 1}), ("f", {"x": {1, 2}})],
)
def test_format_refuses_what_it_cannot_write(name: str, arguments: dict[str, object]) -> None:
    with pytest.raises(ToolCallError):
        format_tool_call(name, arguments)


def test_openai_and_bare_tool_forms() -> None:
    bare = {"name": "get_weather", "description": "d", "parameters": {"type": "object"}}
    wrapped = {"type": "function", "function": {"name": "search", "parameters": {}}}
    assert unwrap_tools([bare, wrapped]) == [bare, {"name": "search", "parameters": {}}]
    assert tool_names([bare, wrapped]) == {"get_weather", "search"}
