"""Helpers for testing your own tools: call one in the real sandbox, as the model would.

    from agent_spo.testing import call_tool

    call = call_tool("my_tools.py:lookup", {"key": "answer"})
    assert call.ok and call.observation == "42"

``call_tool`` starts a one-worker local sandbox that shows your tool module to the jail
(read-only), calls the tool through the same dispatch an episode uses (argument
checking, the generated call, a session for stateful tools) and returns the
:class:`~agent_spo.episode.toolbox.ToolCallResult`: ``observation`` is exactly what the
model would read, ``fault`` whose fault a failure is (model, tool or infrastructure).
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent_spo.episode.toolbox import ToolCallResult


def call_tool(ref: str, arguments: Any = None, **options: Any) -> ToolCallResult:
    """Call the one tool ``ref`` names (a built-in name, ``file.py[:function]`` or
    ``module[:function]``) with ``arguments`` (a dict or JSON text) in a real sandbox;
    ``options`` as for :func:`call_tool_async` (timeout_s, memory_mb, ...)."""
    return asyncio.run(call_tool_async(ref, arguments, **options))


async def call_tool_async(
    ref: str,
    arguments: Any = None,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_output_chars: int = 256,
    unisolated: bool = False,
) -> ToolCallResult:
    from agent_spo.episode.toolbox import Toolbox
    from sandboxes.local import Limits, LocalSandbox
    from tools.refs import ToolReferenceError, resolve

    found = resolve([ref])
    if len(found.tools) != 1:
        names = ", ".join(t.name for t in found.tools)
        raise ToolReferenceError(
            f"tool reference {ref!r} offers {len(found.tools)} tools ({names}); name one "
            f"with {ref.partition(':')[0]}:FUNCTION"
        )
    tool = found.tools[0]
    box = Toolbox([tool], max_output_chars=max_output_chars)
    sandbox = LocalSandbox(
        workers=1,
        limits=Limits(timeout_s=timeout_s, memory_mb=memory_mb),
        isolation="none" if unisolated else "bwrap",
        tool_sources=found.sources,
    )
    async with sandbox:
        async with await sandbox.open_session() as session:
            return await box.call(
                tool.name, arguments if arguments is not None else {}, sandbox=sandbox,
                session=session,
            )  # fmt: skip


__all__ = ["call_tool", "call_tool_async"]
