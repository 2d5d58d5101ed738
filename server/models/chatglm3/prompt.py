"""ChatGLM3's prompt format, as token ids.

The format (ChatGLM3's PROMPT.md)::

    [gMASK] sop
    <|system|> encode(metadata + "\\n") encode(content [+ "\\n" + tools as indented JSON])
    <|user|> encode("\\n") encode(content)
    <|assistant|> encode(metadata + "\\n") encode(content)      metadata: a called tool's name
    <|observation|> encode(metadata + "\\n") encode(content)    a tool's result
    ...
    <|assistant|>                                              the reply starts here

Role markers are special ids and every text goes through SentencePiece on its own, so no message
can contain a marker, whatever it says.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.models.chatglm3.tokenizer import ChatGLM3Tokenizer
from server.models.chatglm3.tools import unwrap_tools

__all__ = ["DEFAULT_TOOLS_SYSTEM_PROMPT", "PromptMessage", "attach_tools", "build_prompt_ids"]

# The system message ChatGLM3's own OpenAI-style demo adds when tools come without one.
DEFAULT_TOOLS_SYSTEM_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)

Tools = Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class PromptMessage:
    """One turn as ChatGLM3 sees it.

    `metadata` is the text after the role marker: a called tool's name on an assistant turn, else
    usually empty. `tools` is set on the system message that offers tools.
    """

    role: str
    content: str
    metadata: str = ""
    tools: Tools | None = None


def attach_tools(messages: Sequence[PromptMessage], tools: Tools | None) -> list[PromptMessage]:
    """The conversation with `tools` offered in its system message.

    They go to the first message when it is a system message; otherwise a system message
    announcing them is put first. No tools (None or empty) leaves the conversation as it is.
    """
    out = list(messages)
    if not tools:
        return out
    if out and out[0].role == "system":
        first = out[0]
        out[0] = PromptMessage(first.role, first.content, first.metadata, tools)
    else:
        out.insert(0, PromptMessage("system", DEFAULT_TOOLS_SYSTEM_PROMPT, tools=tools))
    return out


def _message_ids(tokenizer: ChatGLM3Tokenizer, message: PromptMessage) -> list[int]:
    content = message.content
    if message.role == "system" and message.tools:
        # Tools are listed as ChatGLM3 was trained to read them: indented JSON, non-ASCII kept.
        content += "\n" + json.dumps(unwrap_tools(message.tools), indent=4, ensure_ascii=False)
    return [
        tokenizer.role_id(message.role),
        *tokenizer.encode(message.metadata + "\n"),
        *tokenizer.encode(content),
    ]


def build_prompt_ids(
    tokenizer: ChatGLM3Tokenizer, messages: Sequence[PromptMessage], tools: Tools | None = None
) -> list[int]:
    """The ids of the conversation, ending with the bare <|assistant|> the reply follows."""
    ids = list(tokenizer.prefix_ids)
    for message in attach_tools(messages, tools):
        ids += _message_ids(tokenizer, message)
    ids.append(tokenizer.role_id("assistant"))
    return ids
