"""The episode runner: one loop for single- and multi-turn tool use (STYLE rule 10).

    prompt ──▶ engine.generate ──▶ model turn ──▶ tool call? ──yes──▶ sandbox session
                   ▲                                 │ no                    │
                   └────── context += observation ◀──┼───────────────────────┘
                                                     ▼
                                          verifier ──▶ reward

Stop conditions, checked in this order after each model turn:

1. ``answer``: the turn made no tool call (it ended at end-of-turn, or wrote no call);
2. ``max_turns``: the turn made a call but was the last turn allowed (the call is not run);
3. ``budget``: the episode used ``max_response_tokens`` model tokens;
4. ``context``: the context reached the engine's ``max_model_len``;
5. ``deadline``: the episode's wall clock ran out.

Faults are handled by whose they are (DESIGN §4). A call the model wrote badly, or code
that raised or timed out, goes back to the model as an observation and is counted in
the trajectory's tool calls. A sandbox or engine failure raises :class:`EpisodeDropped`
(after ``retries`` fresh attempts): the episode is dropped and counted, never scored.
Such a failure is one the infrastructure names (STYLE rule 23): a result with an
infrastructure status, a :class:`~sandboxes.errors.SandboxError` or an
:class:`~agent_spo.engines.base.EngineError`. Any other exception (a TypeError in the
toolbox, a sandbox client's bug) is a bug, not a drop: it propagates on the first
attempt with its traceback and stops the run. The sandbox session is opened at the
first call and closed on every path; a close that fails with a SandboxError is counted
(``sandbox/close_failed``), not raised.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agent_spo.data.problems import Problem
from agent_spo.engines.base import Engine, EngineError, Sampling, affinity
from agent_spo.episode.render import ChatRenderer
from agent_spo.episode.rules import RewardRules, apply_rules
from agent_spo.episode.trajectory import Segment, ToolCallRecord, Trajectory
from agent_spo.verify.verdict import Verdict
from sandboxes.errors import SandboxError


class EpisodeDropped(RuntimeError):
    """Infrastructure failed (sandbox or engine): the episode is not scorable."""

    def __init__(self, source: str, reason: str, *, retryable: bool = True) -> None:
        super().__init__(f"{source} failure: {reason}")
        self.source = source  # "engine", "sandbox", "prompt" (too long) or "deadline"
        self.reason = reason
        self.retryable = retryable  # False when a fresh attempt would fail the same way


@dataclass(frozen=True)
class EpisodeSettings:
    max_turns: int = 8  # model turns; 1 = single-turn (a call in it is not run)
    max_response_tokens: int = 512  # model tokens over the whole episode
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    deadline_s: float | None = None  # wall clock per episode; None = none
    tool_timeout_s: float | None = None  # per call; None = the sandbox's default
    retries: int = 2  # fresh attempts after an infrastructure failure
    rules: RewardRules = RewardRules()  # the reference's extra reward conditions (off)


class EpisodeRunner:
    """Runs episodes of one policy against one toolbox, sandbox and verifier."""

    def __init__(
        self,
        engine: Engine,
        renderer: ChatRenderer,
        toolbox,
        sandbox,
        verifier,
        settings: EpisodeSettings = EpisodeSettings(),
    ) -> None:
        self.engine = engine
        self.renderer = renderer
        self.toolbox = toolbox
        self.sandbox = sandbox
        self.verifier = verifier
        self.settings = settings
        self.counters: Counter[str] = Counter()  # dropped/<source>, retried, tool/<fault>, ...

    async def run(
        self, problem: Problem, *, seed: int | None = None, info: dict[str, Any] | None = None
    ) -> Trajectory:
        """One scored (or explicitly unscorable) trajectory; raises EpisodeDropped."""
        last: EpisodeDropped | None = None
        for attempt in range(self.settings.retries + 1):
            try:
                # a retry samples afresh: a fault the model's own output provoked
                # should not replay identically
                seed_a = None if seed is None else (seed * 7919 + attempt * 104729) % 2**40
                with affinity(object()):  # this attempt's turns stay on one replica
                    traj = await self._attempt(
                        problem, seed_a, {**(info or {}), "attempt": attempt}
                    )
                self.counters["episodes"] += 1
                self.counters[f"stop/{traj.stop_reason}"] += 1
                return traj
            except EpisodeDropped as e:
                self.counters[f"dropped/{e.source}"] += 1
                last = e
                if not e.retryable:
                    break
                if attempt < self.settings.retries:
                    self.counters["retried"] += 1
        assert last is not None
        raise last

    async def _attempt(self, problem: Problem, seed: int | None, info: dict) -> Trajectory:
        s = self.settings
        t_start = time.perf_counter()
        timings = {"generate_s": 0.0, "tool_s": 0.0, "verify_s": 0.0}
        prompt = self.renderer.prompt_ids(problem.problem)
        context = list(prompt)
        segments: list[Segment] = []
        calls: list[ToolCallRecord] = []
        used = 0  # model tokens so far
        last_turn: list[int] = []
        turn_texts: list[str] = []  # each model turn, special tokens kept
        stop_reason = None
        session = None
        ended_on_call = False  # the last model turn asked for a tool that never answered
        try:
            limit = self.engine.max_model_len
        except EngineError as e:
            raise EpisodeDropped("engine", str(e)) from e
        if len(prompt) >= limit:
            raise EpisodeDropped(
                "prompt",
                f"the prompt has {len(prompt)} tokens; the context limit is {limit}",
                retryable=False,
            )
        try:
            for turn in range(s.max_turns):
                room = min(s.max_response_tokens - used, limit - len(context))
                if room < 1:
                    stop_reason = "budget" if used >= s.max_response_tokens else "context"
                    break
                sampling = Sampling(
                    max_tokens=room,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    stop=self.renderer.stop,
                    stop_token_ids=self.renderer.stop_token_ids,
                    seed=None if seed is None else seed * 1000 + turn,
                )
                t0 = time.perf_counter()
                try:
                    gen = await self._with_deadline(
                        self.engine.generate(context, sampling), t_start
                    )
                except EngineError as e:
                    raise EpisodeDropped("engine", str(e)) from e
                except TimeoutError:
                    stop_reason = "deadline"
                    break
                timings["generate_s"] += time.perf_counter() - t0
                for a, b, version in gen.runs():  # split where a weight update landed
                    segments.append(
                        Segment("model", gen.token_ids[a:b], gen.logprobs[a:b], version)
                    )
                context.extend(gen.token_ids)
                used += len(gen.token_ids)
                last_turn = list(gen.token_ids)
                text = self.renderer.tokenizer.decode(gen.token_ids, skip_special_tokens=False)
                turn_texts.append(text)
                call = self.renderer.fmt.parse(text) if gen.finish_reason == "stop" else None
                if call is None:
                    if gen.finish_reason == "length":
                        stop_reason = "budget" if used >= s.max_response_tokens else "context"
                    else:
                        stop_reason = "answer"
                    break
                ended_on_call = True
                if turn == s.max_turns - 1:
                    stop_reason = "max_turns"
                    break
                if used >= s.max_response_tokens:  # no budget left to read the result
                    stop_reason = "budget"
                    break
                if session is None and call.error is None:
                    session = await self._open_session()
                t0 = time.perf_counter()
                record = await self._call_tool(call, session)
                timings["tool_s"] += time.perf_counter() - t0
                calls.append(record)
                self.counters[f"tool/{record.fault or 'ok'}"] += 1
                obs = self.renderer.observation(record.observation)
                n_obs = sum(len(x.token_ids) for x in obs)
                if len(context) + n_obs >= limit:
                    stop_reason = "context"
                    break
                segments.extend(obs)
                for x in obs:
                    context.extend(x.token_ids)
                ended_on_call = False
                if s.deadline_s is not None and time.perf_counter() - t_start >= s.deadline_s:
                    stop_reason = "deadline"
                    break
            else:  # pragma: no cover - every path through the loop sets a reason
                stop_reason = "max_turns"
        finally:
            if session is not None:
                try:
                    await session.close()
                except SandboxError:  # a dead session is already gone
                    self.counters["sandbox/close_failed"] += 1
        if not segments:  # the deadline passed before the first turn finished
            raise EpisodeDropped(
                "deadline", f"no model turn finished within {s.deadline_s} s", retryable=False
            )
        t0 = time.perf_counter()
        if stop_reason == "deadline":
            # The clock counts engine and sandbox queueing too, so running out of it is
            # not the model's doing alone: the episode is kept for inspection, not scored.
            verdict = Verdict(False, "timeout", f"the episode passed its {s.deadline_s} s deadline")
        elif ended_on_call:  # the last turn asked for a tool: no answer was given
            verdict = Verdict(
                False, "no_answer", f"the episode ended on a tool call ({stop_reason})"
            )
        else:
            final_text = self.renderer.tokenizer.decode(last_turn, skip_special_tokens=True)
            verdict = await self.verifier.acheck(problem.answer, final_text)
            verdict = apply_rules(verdict, s.rules, turn_texts, self.renderer.fmt.parse)
        timings["verify_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        return Trajectory(
            prompt_id=problem.id,
            prompt_token_ids=tuple(prompt),
            segments=tuple(segments),
            tool_calls=tuple(calls),
            answer=verdict.prediction,
            verdict=verdict.status,
            reward=verdict.reward,
            timings=timings,
            stop_reason=stop_reason,
            info={
                "prompt_key": problem.key,
                "gold": problem.answer,
                "verdict_reason": verdict.reason,
                **info,
            },
        )

    async def _with_deadline(self, coro, t_start: float):
        if self.settings.deadline_s is None:
            return await coro
        left = self.settings.deadline_s - (time.perf_counter() - t_start)
        if left <= 0:
            coro.close()
            raise TimeoutError
        return await asyncio.wait_for(coro, left)

    async def _open_session(self):
        try:
            return await self.sandbox.open_session()
        except SandboxError as e:
            raise EpisodeDropped("sandbox", f"could not open a session: {e}") from e

    async def _call_tool(self, call, session) -> ToolCallRecord:
        if call.error is not None:  # the model's syntax: nothing ran
            return ToolCallRecord(call.name, None, call.error, "model", None, 0.0)
        t0 = time.perf_counter()
        try:
            res = await self.toolbox.call(
                call.name,
                call.arguments,
                sandbox=self.sandbox,
                session=session,
                timeout_s=self.settings.tool_timeout_s,
            )
        except SandboxError as e:
            raise EpisodeDropped("sandbox", f"{type(e).__name__}: {e}") from e
        if res.fault == "infrastructure":
            raise EpisodeDropped("sandbox", res.full_output)
        result = res.result
        return ToolCallRecord(
            name=res.name,
            arguments=res.arguments,
            observation=res.observation,
            fault=res.fault,
            status=None if result is None else result.status,
            latency_s=time.perf_counter() - t0,
            result=None if result is None else result.to_dict(),
        )
