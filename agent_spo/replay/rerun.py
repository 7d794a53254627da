"""Re-run one logged episode's tool calls in a fresh sandbox session and re-verify it.

The model is not sampled again: its recorded turns are replayed as they were, each tool
call is executed again in order in one new session (so state carries between calls as
it did), and the final answer is checked again with the verifier. Any difference from
the log is reported: a tool whose output changed (non-determinism, a sandbox or library
change) or a verdict that changed (a verifier change) is exactly what this is for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallCheck:
    index: int
    name: str
    ran: bool  # False for a malformed call: nothing ran then, nothing runs now
    status: tuple[str | None, str | None]  # (logged, now)
    fault: tuple[str | None, str | None]
    observation: tuple[str, str]
    latency_s: tuple[float, float]

    @property
    def same(self) -> bool:
        return (
            self.status[0] == self.status[1]
            and self.fault[0] == self.fault[1]
            and self.observation[0] == self.observation[1]
        )


@dataclass(frozen=True)
class RerunReport:
    calls: tuple[CallCheck, ...]
    verified: bool  # False: the episode had no answer to check (deadline, ended on a call)
    verdict: tuple[str | None, str | None]  # (logged, now)
    reward: tuple[float | None, float | None]
    answer: tuple[str | None, str | None]
    reason: tuple[str | None, str | None]

    @property
    def differences(self) -> list[str]:
        out = []
        for c in self.calls:
            if c.same:
                continue
            what = [
                f"{label} {a!r} -> {b!r}"
                for label, (a, b) in (("status", c.status), ("fault", c.fault))
                if a != b
            ]
            if c.observation[0] != c.observation[1]:
                what.append("output differs")
            out.append(f"tool call {c.index + 1} ({c.name}): " + ", ".join(what))
        for label, (a, b) in (
            ("verdict", self.verdict), ("reward", self.reward), ("answer", self.answer),
        ):  # fmt: skip
            if a != b:
                out.append(f"{label}: {a!r} -> {b!r}")
        return out


def _final_text(row: dict, tokenizer) -> tuple[str, str] | None:
    """(text with special tokens, text without) of the last model turn (its model
    segments in a row: a weight update mid-turn splits it)."""
    segments = row["segments"]
    end = next((i for i in range(len(segments) - 1, -1, -1)
                if segments[i]["kind"] == "model"), None)  # fmt: skip
    if end is None:
        return None
    start = end
    while start > 0 and segments[start - 1]["kind"] == "model":
        start -= 1
    ids = [t for s in segments[start : end + 1] for t in s["token_ids"]]
    return (
        tokenizer.decode(ids, skip_special_tokens=False),
        tokenizer.decode(ids, skip_special_tokens=True),
    )


def _turn_texts(row: dict, tokenizer) -> list[str]:
    """Each model turn's text, special tokens kept (split turns joined)."""
    turns: list[list[int]] = []
    prev = None
    for s in row["segments"]:
        if s["kind"] == "model":
            if prev == "model":
                turns[-1] += s["token_ids"]
            else:
                turns.append(list(s["token_ids"]))
        prev = s["kind"]
    return [tokenizer.decode(t, skip_special_tokens=False) for t in turns]


async def rerun_episode(
    row: dict,
    *,
    toolbox,
    renderer,
    sandbox,
    verifier,
    tool_timeout_s: float | None = None,
    rules=None,
) -> RerunReport:
    """Execute the row's tool calls again and re-verify its answer; compare with the log."""
    import asyncio
    import time

    checks: list[CallCheck] = []
    session = None
    try:
        for i, c in enumerate(row.get("tool_calls") or []):
            logged = (c.get("status"), c.get("fault"), c.get("observation") or "")
            if c.get("arguments") is None:  # the model's syntax was bad: nothing ran
                checks.append(CallCheck(i, c.get("name") or "?", False, logged[:1] * 2,
                                        logged[1:2] * 2, (logged[2], logged[2]),
                                        (c.get("latency_s") or 0.0, 0.0)))  # fmt: skip
                continue
            if session is None:
                session = await sandbox.open_session()
            t0 = time.perf_counter()
            res = await toolbox.call(
                c["name"], dict(c["arguments"]), sandbox=sandbox, session=session,
                timeout_s=tool_timeout_s,
            )  # fmt: skip
            now = (None if res.result is None else res.result.status, res.fault, res.observation)
            checks.append(CallCheck(
                i, c["name"], True, (logged[0], now[0]), (logged[1], now[1]),
                (logged[2], now[2]), (c.get("latency_s") or 0.0, time.perf_counter() - t0),
            ))  # fmt: skip
    finally:
        if session is not None:
            await session.close()

    info = row.get("info") or {}
    logged_v = (
        row.get("verdict"),
        row.get("reward"),
        row.get("answer"),
        info.get("verdict_reason"),
    )
    texts = _final_text(row, renderer.tokenizer)
    gold = info.get("gold")
    ended_on_call = (
        texts is not None
        and row.get("stop_reason") != "answer"
        and renderer.fmt.parse(texts[0]) is not None
    )
    if row.get("stop_reason") == "deadline" or texts is None or gold is None:
        now_v = logged_v
        verified = False
    elif ended_on_call:  # the runner scores this no_answer without asking the verifier
        now_v = ("no_answer", 0.0, None, f"the episode ended on a tool call ({row['stop_reason']})")
        verified = True
    else:
        v = await asyncio.to_thread(verifier.check, gold, texts[1])
        if rules is not None:  # the run's reward conditions, as the runner applied them
            from agent_spo.episode.rules import apply_rules

            v = apply_rules(v, rules, _turn_texts(row, renderer.tokenizer), renderer.fmt.parse)
        now_v = (v.status, v.reward, v.prediction, v.reason)
        verified = True
    return RerunReport(
        calls=tuple(checks),
        verified=verified,
        verdict=(logged_v[0], now_v[0]),
        reward=(logged_v[1], now_v[1]),
        answer=(logged_v[2], now_v[2]),
        reason=(logged_v[3], now_v[3]),
    )
