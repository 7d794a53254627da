"""Sandbox latency and throughput benchmark (`agent-spo sandbox bench`).

For each workload (a stateless call, a session call, a sympy tool call) and each
concurrency level, issue `calls` calls from `concurrency` concurrent clients and report
the median and p99 end-to-end latency and the calls per second. A soak phase runs many
calls and compares the jail's process count, its RSS and the controller's open file
descriptors before and after (a leak shows as growth).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from sandboxes.local import LocalSandbox

STATELESS = "print(2**100)"
SESSION = "x = x + 1 if 'x' in dir() else 0\nx"
SYMPY_TOOL = ("factor", {"expression": "x**4 - 1"})


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


async def _measure(
    fn: Callable[[int], Awaitable[object]], calls: int, concurrency: int, think_s: float = 0.0
) -> dict:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(calls))

    async def client(cid: int) -> None:
        nonlocal failures
        for _ in counter:
            if think_s:
                await asyncio.sleep(think_s)  # the model generating between tool calls
            t0 = time.perf_counter()
            result = await fn(cid)
            latencies.append(time.perf_counter() - t0)
            if getattr(result, "status", "ok") != "ok":
                failures += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "calls": calls,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "calls_per_s": calls / elapsed,
        "failures": failures,
    }


async def run_bench(
    *,
    workers: int = 2,
    calls: int = 300,
    concurrency: Sequence[int] = (1, 2, 4),
    soak: int = 0,
    isolation: Literal["bwrap", "none"] = "bwrap",
    think_ms: float = 0.0,
) -> dict:
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    toolbox = Toolbox(builtin_tools())
    tool = toolbox.tools[SYMPY_TOOL[0]]
    sympy_code = toolbox.code_for(tool, tool.validate(SYMPY_TOOL[1]))
    report: dict = {"workers": workers, "isolation": isolation, "think_ms": think_ms, "results": []}
    async with LocalSandbox(workers=workers, isolation=isolation) as sb:
        report["capabilities"] = sb.capabilities
        for _ in range(20):  # warm every worker's spare and caches
            await sb.run(sympy_code)
        for c in concurrency:
            sessions = [await sb.open_session() for _ in range(c)]
            cases: dict[str, Callable[..., Awaitable[object]]] = {
                "stateless": lambda cid: sb.run(STATELESS),
                "session": lambda cid, s=sessions: s[cid].run(SESSION),
                "sympy_tool": lambda cid: sb.run(sympy_code),
            }
            for name, fn in cases.items():
                row = await _measure(fn, calls, c, think_ms / 1000)
                report["results"].append({"workload": name, **row})
            for s in sessions:
                await s.close()
        if soak:
            before = sb.footprint()
            session = await sb.open_session()
            for i in range(soak):
                if i % 2:
                    await session.run(SESSION)
                else:
                    await sb.run(STATELESS)
            await session.close()
            after = sb.footprint()
            report["soak"] = {"calls": soak, "before": before, "after": after}
    return report
