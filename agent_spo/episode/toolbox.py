"""A set of tools, how a model's call is dispatched into a sandbox, and what the model sees.

Faults are labelled by whose they are (DESIGN §4): ``model`` (unknown tool, bad or
malformed arguments; nothing ran), ``tool`` (the code raised, timed out or hit a
limit), ``infrastructure`` (the sandbox failed; the episode should be dropped and
counted, never scored). The model-facing observation is capped head + tail at
``max_output_chars``; the full text and the typed sandbox result are kept for logs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sandboxes.result import ExecResult
from tools.sdk import Tool, ToolArgumentError

Fault = Literal["model", "tool", "infrastructure"]


class CodeRunner(Protocol):
    """Anything with `run(code)`: a sandbox (stateless) or one of its sessions."""

    async def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult: ...


@dataclass(frozen=True)
class ToolCallResult:
    name: str
    arguments: dict | None  # validated arguments; None when the call was malformed
    observation: str  # what the model sees (capped)
    full_output: str  # the same text before capping
    result: ExecResult | None  # the sandbox's typed result; None when nothing ran
    fault: Fault | None

    @property
    def ok(self) -> bool:
        return self.fault is None


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep the head and tail of `text` within `max_chars` (plus a marker)."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    omitted = len(text) - max_chars
    return f"{text[:head]}\n...({omitted} characters truncated)...\n{text[len(text) - tail :]}"


def render(result: ExecResult, *, traceback: bool = True, session: bool = False) -> str:
    """The text a model reads for a sandbox result (before capping).

    ``traceback=False`` shows only the exception line: for function tools, whose cell
    is generated code the model never wrote. ``session=True`` tells the model that a
    killed cell's changes to its variables were rolled back.
    """
    kept = "; variables from this call were not kept" if session else ""
    parts = [result.stdout]
    if result.stderr:
        parts.append(result.stderr)
    status = result.status
    if status == "error" or status == "memory":
        line = f"{result.exc_type}: {result.exc_message}"
        parts.append(result.traceback or line if traceback else line)
    elif status == "timeout":
        parts.append(f"[timed out after {result.wall_s:.1f} s; the call was stopped{kept}]")
    elif status == "output_limit":
        parts.append(
            f"[output limit exceeded after {result.stdout_bytes + result.stderr_bytes} "
            f"bytes; the call was stopped{kept}]"
        )
    elif status == "crashed":
        how = f"signal {result.signal}" if result.signal else f"exit code {result.exit_code}"
        parts.append(f"[the process crashed ({how}){kept}]")
    elif status != "ok":
        parts.append(f"[sandbox failure: {status}]")
    text = "".join(p if p.endswith("\n") or not p else p + "\n" for p in parts if p)
    return text.rstrip("\n") if text.strip() else "[no output]"


class Toolbox:
    """The tools an agent may call, with dispatch into a sandbox."""

    def __init__(self, tools: Iterable[Tool], *, max_output_chars: int = 256) -> None:
        self.tools: dict[str, Tool] = {}
        for t in tools:
            if t.name in self.tools:
                raise ValueError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t
        self.max_output_chars = max_output_chars

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def schemas(self) -> list[dict]:
        """Function-calling schemas for the chat template, in registration order."""
        return [t.schema() for t in self.tools.values()]

    def offered(self) -> list[dict]:
        """What a sandbox server advertises and a client checks: each tool's schema and
        the function its calls import there (``module:function``; None for code tools)."""
        from tools.refs import offer

        return offer(self.tools.values())

    def code_for(self, tool: Tool, args: Mapping[str, Any]) -> str:
        """The Python cell that performs a validated call inside the sandbox."""
        if tool.kind == "code":
            return next(iter(args.values()))
        payload = json.dumps(dict(args))
        # one expression that binds no name: a stateful tool's call leaves the session's
        # variables (the model's own, in its python cells) as they were
        return (
            "__import__('tools.sdk', fromlist=['sdk']).run_in_sandbox("
            f"{tool.module!r}, {tool.fn.__name__!r}, {payload!r})"
        )

    async def call(
        self,
        name: str,
        arguments: Any,
        *,
        sandbox: CodeRunner,
        session: CodeRunner | None = None,
        timeout_s: float | None = None,
    ) -> ToolCallResult:
        """Validate and run one tool call; never raises for the model's mistakes."""
        tool = self.tools.get(name)
        if tool is None:
            msg = f"unknown tool {name!r}; available tools: {', '.join(self.tools) or 'none'}"
            return ToolCallResult(name, None, msg, msg, None, "model")
        try:
            args = tool.validate(arguments)
        except ToolArgumentError as e:
            return ToolCallResult(name, None, str(e), str(e), None, "model")
        runner = session if (tool.stateful and session is not None) else sandbox
        result = await runner.run(self.code_for(tool, args), timeout_s=timeout_s)
        full = render(result, traceback=tool.kind == "code", session=runner is session)
        fault: Fault | None = None
        if result.infrastructure_failure:
            fault = "infrastructure"
        elif not result.ok:
            fault = "tool"
        return ToolCallResult(
            name, args, truncate_middle(full, self.max_output_chars), full, result, fault
        )
