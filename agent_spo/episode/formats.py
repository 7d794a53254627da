"""Tool-call syntax: how a model's turn asks for a tool, and how the result is shown.

Two formats (spec §6):

* ``retool`` (the reference recipe): the model writes ``<code>`` + a fenced python block +
  ``</code>``; generation stops at ``</code>``; the first block runs in the episode's
  sandbox session; its output comes back as ``<interpreter>\\n...\\n</interpreter>``.
* ``hermes`` (Qwen3's native tool calling): ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`` with the tool schemas given through the chat template.

Parsing works on the text of one model turn and never raises: a call the model wrote
badly comes back as a :class:`ParsedCall` with ``error`` set, which the runner feeds back
to the model as an observation (a model fault, counted), not an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tools.sdk import Tool


@dataclass(frozen=True)
class ParsedCall:
    name: str  # tool name; "" when the call was too broken to name one
    arguments: Any  # usually a dict; the toolbox validates it
    raw: str  # the exact text of the call in the model's turn
    error: str | None = None  # model-facing message when the syntax is broken


class ToolFormat(Protocol):
    name: str
    stop: tuple[str, ...]  # stop strings that end a turn at a complete call
    system_prompt: str  # default instructions: how to call tools and give the answer

    def parse(self, turn_text: str) -> ParsedCall | None: ...

    def observation(self, text: str) -> str: ...


_CODE = re.compile(r"<code>(.*?)</code>", re.S)
_FENCE_OPEN = re.compile(r"^\s*```[ \t]*(?:python|py|python3)?[ \t]*\n?", re.I)
_FENCE_CLOSE = re.compile(r"\n?[ \t]*```\s*$")


class RetoolFormat:
    """``<code>```python ...```</code>`` calls the python tool; output in ``<interpreter>``."""

    name = "retool"
    stop: tuple[str, ...] = ("</code>",)
    system_prompt = (
        "Solve the math problem. To run Python, write <code>\n```python\n...\n```\n</code>; "
        "the output appears in <interpreter></interpreter>. Put the final answer in \\boxed{}."
    )

    def __init__(self, tool: str = "python", argument: str = "code") -> None:
        self.tool, self.argument = tool, argument  # the code tool a block calls

    def parse(self, turn_text: str) -> ParsedCall | None:
        m = _CODE.search(turn_text)
        if m is None:
            return None  # no (complete) call: the turn is a final answer or ran out of budget
        body = _FENCE_CLOSE.sub("", _FENCE_OPEN.sub("", m.group(1), count=1), count=1)
        if not body.strip():
            return ParsedCall(self.tool, None, m.group(0), "the <code> block is empty")
        return ParsedCall(self.tool, {self.argument: body}, m.group(0))

    def observation(self, text: str) -> str:
        return f"\n<interpreter>\n{text}\n</interpreter>\n\n"


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_EXPECTED = 'expected <tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>'


class HermesFormat:
    """``<tool_call>{json}</tool_call>``; results go back as ``tool`` messages."""

    name = "hermes"
    stop = ("</tool_call>",)
    system_prompt = (
        "Solve the math problem. Use the tools to compute. Put the final answer in \\boxed{}."
    )

    def parse(self, turn_text: str) -> ParsedCall | None:
        m = _TOOL_CALL.search(turn_text)
        if m is None:
            return None
        raw, body = m.group(0), m.group(1)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as e:
            where = f" ({e.msg} at position {e.pos})" if isinstance(e, json.JSONDecodeError) else ""
            return ParsedCall("", None, raw, f"the tool call is not valid JSON{where}; {_EXPECTED}")
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return ParsedCall("", None, raw, f"the tool call has no tool name; {_EXPECTED}")
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):  # some models encode the arguments object twice
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass  # leave it: the toolbox reports what was wrong with it
        return ParsedCall(obj["name"], arguments, raw)

    def observation(self, text: str) -> str:
        # The chat template renders tool messages; this is the message content.
        return text


FORMATS: dict[str, type] = {"retool": RetoolFormat, "hermes": HermesFormat}


def get_format(name: str, code_tool: Tool | None = None) -> ToolFormat:
    """The format ``name``; retool's blocks call ``code_tool`` (default: python)."""
    try:
        cls = FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool format {name!r}; allowed: {', '.join(FORMATS)}") from None
    if cls is RetoolFormat and code_tool is not None:
        return RetoolFormat(code_tool.name, next(iter(code_tool.parameters["properties"])))
    return cls()
