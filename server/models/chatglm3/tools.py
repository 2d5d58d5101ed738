"""ChatGLM3 tool calls: reading them out of a reply without running it, and writing them back.

ChatGLM3 answers a tool call with the tool's name on the first line and a Python block holding one
call of `tool_call` with keyword arguments::

    get_weather
    ```python
    tool_call(location="Beijing", unit="celsius")
    ```

ChatGLM3's own code `eval`s that block, which runs whatever the model (or a prompt injection that
steered it) wrote. Here the block is parsed with `ast` and accepted only when it is exactly one call
of the bare name `tool_call` whose arguments are all keyword arguments with literal values;
each value goes through `ast.literal_eval`, which builds constants and containers and runs nothing.

This module is pure (no torch, no model) so that it can be tested and reused on its own.
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_TOOL_CALL_CHARS",
    "ToolCall",
    "ToolCallError",
    "format_tool_call",
    "parse_tool_call",
    "tool_names",
    "try_parse_tool_call",
    "unwrap_tools",
]

# A reply longer than this is not parsed as a tool call: real calls are short, and a bound keeps
# ast.parse away from pathological inputs (deep nesting, huge literals).
MAX_TOOL_CALL_CHARS = 64 * 1024
# Nesting deeper than this in an argument value is refused (ast.parse itself recurses per level).
_MAX_DEPTH = 32
# OpenAI's rule for function names, which ChatGLM3's tool names also follow.
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
# The fenced block after the name line; the language tag is optional ("python" in practice).
_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(?P<code>.*?)\n?[ \t]*```", re.DOTALL)


class ToolCallError(ValueError):
    """A reply shaped like a tool call that is not a valid, literal-only one."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One structured function call: the tool's name and its JSON-compatible arguments."""

    name: str
    arguments: Mapping[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as a JSON object, the form OpenAI's `function.arguments` carries."""
        return json.dumps(dict(self.arguments), ensure_ascii=False, allow_nan=False)


def unwrap_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tools in the bare form ChatGLM3 was trained on: {"name", "description", "parameters"}.

    OpenAI-style entries ({"type": "function", "function": {...}}) are unwrapped to their function.
    """
    bare: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function")
        if tool.get("type", "function") == "function" and isinstance(function, Mapping):
            bare.append(dict(function))
        else:
            bare.append(dict(tool))
    return bare


def tool_names(tools: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """The names of the given tools (either form), for checking which tool a reply calls."""
    return frozenset(str(t["name"]) for t in unwrap_tools(tools) if "name" in t)


def _depth(node: ast.AST, limit: int) -> int:
    """How deeply `node` nests, stopping early once past `limit`."""
    deepest = 0
    stack: list[tuple[ast.AST, int]] = [(node, 1)]
    while stack:
        current, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level + 1) for child in ast.iter_child_nodes(current))
    return deepest


def _json_value(value: Any, where: str) -> Any:
    """`value` in JSON's types: tuples become lists; sets, bytes, complex and NaN are refused."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolCallError(f"{where}: {value!r} has no JSON form")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ToolCallError(f"{where}: dictionary keys must be strings, got {key!r}")
            out[key] = _json_value(item, where)
        return out
    raise ToolCallError(f"{where}: a {type(value).__name__} has no JSON form")


def _parse_call(code: str) -> dict[str, Any]:
    """The keyword arguments of the single `tool_call(...)` expression in `code`."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ToolCallError(f"the tool call is not a Python expression: {exc}") from None
    call = tree.body
    if not isinstance(call, ast.Call):
        raise ToolCallError("the tool call must be a single call of tool_call(...)")
    if not isinstance(call.func, ast.Name) or call.func.id != "tool_call":
        raise ToolCallError(f"only tool_call(...) may be called, not {ast.unparse(call.func)!r}")
    if call.args:
        raise ToolCallError("tool_call takes keyword arguments only")
    if _depth(call, _MAX_DEPTH) > _MAX_DEPTH:
        raise ToolCallError(f"the tool call nests deeper than {_MAX_DEPTH} levels")
    arguments: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ToolCallError("tool_call(**...) is not allowed")
        if kw.arg in arguments:
            raise ToolCallError(f"argument {kw.arg!r} is given twice")
        where = f"argument {kw.arg!r}"
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
            raise ToolCallError(f"{where} is not a literal: {exc}") from None
        arguments[kw.arg] = _json_value(value, where)
    return arguments


def parse_tool_call(reply: str, allowed_names: Iterable[str] | None = None) -> ToolCall:
    """Parse a reply `NAME\\n```python\\ntool_call(...)\\n```` into a ToolCall.

    `allowed_names`, when given, are the tools offered in the conversation; a call of any other
    name is refused. Raises ToolCallError for anything that is not exactly such a call.
    """
    if len(reply) > MAX_TOOL_CALL_CHARS:
        raise ToolCallError(f"the reply is longer than {MAX_TOOL_CALL_CHARS} characters")
    head, newline, body = reply.strip().partition("\n")
    name = head.strip()
    if not newline or not _NAME.fullmatch(name):
        raise ToolCallError("a tool call starts with the tool's name alone on the first line")
    if allowed_names is not None and name not in set(allowed_names):
        raise ToolCallError(f"tool {name!r} was not offered")
    block = _BLOCK.fullmatch(body.strip())
    if block is None:
        raise ToolCallError("the tool's name must be followed by one ```python block")
    return ToolCall(name=name, arguments=_parse_call(block.group("code")))


def try_parse_tool_call(reply: str, allowed_names: Iterable[str] | None = None) -> ToolCall | None:
    """The reply's tool call, or None when the reply is not a valid one (then it is plain text)."""
    try:
        return parse_tool_call(reply, allowed_names)
    except ToolCallError:
        return None


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> tuple[str, str]:
    """An assistant turn that called a tool, as ChatGLM3 writes it: (metadata, content).

    The metadata is the tool's name; the content is the python block. Used to put a past call back
    into a prompt. JSON values print as Python literals with repr (true -> True, null -> None).
    """
    if not _NAME.fullmatch(name):
        raise ToolCallError(f"{name!r} is not a valid tool name")
    parts = []
    for key, value in arguments.items():
        if not key.isidentifier() or keyword.iskeyword(key):
            raise ToolCallError(f"argument name {key!r} is not a Python identifier")
        parts.append(f"{key}={_json_value(value, f'argument {key!r}')!r}")
    return name, "```python\ntool_call(" + ", ".join(parts) + ")\n```"
