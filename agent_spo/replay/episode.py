"""One logged episode made readable: turns, tool calls, verdict, tracker, tokens.

Both viewers (the terminal and the static HTML page) draw from :class:`EpisodeView`, so
they show the same things. A view is built from a log row and the tokenizer that made
it; nothing is re-tokenised, token ids are only decoded for display.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from agent_spo.episode.log import EpisodeSummary

_CAPPED = re.compile(r"\.\.\.\((\d+) characters truncated\)\.\.\.")
_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


@dataclass(frozen=True)
class ToolCallView:
    name: str
    code: str | None  # the python cell, or the JSON arguments of a function tool
    arguments: dict | None
    status: str | None  # the sandbox's typed status (ok, error, timeout, ...)
    fault: str | None  # None, model, tool, infrastructure
    latency_s: float
    observation: str  # what the model saw (capped)
    stdout: str | None
    stderr: str | None
    exception: str | None  # "ZeroDivisionError: division by zero"
    wall_s: float | None  # inside the sandbox
    markers: tuple[str, ...]  # truncation notes


@dataclass(frozen=True)
class TurnView:
    index: int
    text: str  # the model's text, special tokens kept (tool-call tags are special)
    tokens: int
    policy_version: int | str | None  # "3→4": a weight update landed during the turn
    call: ToolCallView | None
    observation: str | None  # the tokens appended after the turn (template + tool), decoded
    markers: tuple[str, ...]


@dataclass(frozen=True)
class TrackerView:
    step: int | None
    v_hat_before: float | None
    v_hat_after: float | None
    adv: float | None  # the batch-normalised advantage the learner used, when logged
    adv_raw: float | None  # r − v̂_before
    lag: int | None
    note: str


@dataclass(frozen=True)
class EpisodeView:
    index: int
    prompt_id: str
    problem: str
    gold: str | None
    answer: str | None
    verdict: str | None
    reason: str | None
    reward: float | None
    stop_reason: str | None
    turns: tuple[TurnView, ...]
    tracker: TrackerView
    policy_versions: tuple[int, ...]
    timings: dict[str, float]
    source: dict[str, Any]  # the eval object (dataset, sample) or {}
    tokens: tuple[tuple[str, str], ...] = field(
        default=()
    )  # (text, kind): prompt/model/tool/template
    markers: tuple[str, ...] = ()  # episode-level truncation notes

    def to_dict(self) -> dict:
        return asdict(self)


def _decode(tokenizer, ids: Sequence[int], **kw) -> str:
    return tokenizer.decode(list(ids), **kw)


def problem_text(tokenizer, prompt_ids: Sequence[int]) -> str:
    """The user's message inside the rendered prompt (the whole prompt if none is found)."""
    text = _decode(tokenizer, prompt_ids, skip_special_tokens=False)
    found = _USER.findall(text)
    return found[-1].strip() if found else text


def _call_view(c: dict) -> ToolCallView:
    args = c.get("arguments")
    result = c.get("result") or {}
    if args is None:
        code = None
    elif c.get("name") == "python" and isinstance(args.get("code"), str):
        code = args["code"]
    else:
        import json

        code = json.dumps(args, ensure_ascii=False)
    markers = []
    m = _CAPPED.search(c.get("observation") or "")
    if m:
        markers.append(f"output cut for the model ({m.group(1)} characters left out)")
    for stream in ("stdout", "stderr"):
        if result.get(f"{stream}_truncated"):
            markers.append(
                f"{stream} hit the sandbox's capture limit ({result.get(f'{stream}_bytes')} "
                "bytes written)"
            )
    exc = None
    if result.get("exc_type"):
        exc = f"{result['exc_type']}: {result.get('exc_message') or ''}".strip()
    return ToolCallView(
        name=c.get("name") or "?",
        code=code,
        arguments=args,
        status=c.get("status"),
        fault=c.get("fault"),
        latency_s=float(c.get("latency_s") or 0.0),
        observation=c.get("observation") or "",
        stdout=result.get("stdout"),
        stderr=result.get("stderr"),
        exception=exc,
        wall_s=result.get("wall_s"),
        markers=tuple(markers),
    )


def tracker_view(row: dict) -> TrackerView:
    """v̂ before/after, advantage and lag from a training row's `train` object."""
    t = row.get("train")
    if not t:
        return TrackerView(None, None, None, None, None, None,
                           "not a training episode (no tracker update, no advantage)")  # fmt: skip
    v = t.get("v_hat")
    after = t.get("v_after", t.get("v_hat_after"))  # the trainer writes v_after
    r = row.get("reward")
    raw = None if v is None or r is None else r - v
    notes = []
    if after is None and v is not None:
        notes.append("v̂ after is not in this log")
    if t.get("adv") is None:
        notes.append("the normalised advantage is not in this log; raw A = r − v̂ shown")
    if v is None:
        group = t.get("group")
        notes = ["GRPO episode: no tracker baseline; the advantage is the group's"
                 + (f" (group {group})" if group is not None else "")]  # fmt: skip
    return TrackerView(
        step=t.get("step"),
        v_hat_before=v,
        v_hat_after=after,
        adv=t.get("adv"),
        adv_raw=t.get("adv_raw", raw),
        lag=t.get("lag"),
        note="; ".join(notes),
    )


def episode_view(row: dict, tokenizer, index: int, *, tokens: bool = False) -> EpisodeView:
    """Everything the viewers show about one log row."""
    segments = row["segments"]
    calls = row.get("tool_calls") or []
    turns: list[TurnView] = []
    token_spans: list[tuple[str, str]] = []
    if tokens:
        token_spans += [(_decode(tokenizer, [t]), "prompt") for t in row["prompt_token_ids"]]
    i = 0
    while i < len(segments):
        seg = segments[i]
        if tokens:
            token_spans += [(_decode(tokenizer, [t]), seg["kind"]) for t in seg["token_ids"]]
        if seg["kind"] != "model":  # a template/tool run before any model turn (none today)
            i += 1
            continue
        # one turn: the model segments a weight update split stay one turn ("v3→v4")
        model_ids = list(seg["token_ids"])
        turn_versions = [seg.get("policy_version")]
        j = i + 1
        while j < len(segments) and segments[j]["kind"] == "model":
            if tokens:
                token_spans += [
                    (_decode(tokenizer, [t]), "model") for t in segments[j]["token_ids"]
                ]
            model_ids += segments[j]["token_ids"]
            turn_versions.append(segments[j].get("policy_version"))
            j += 1
        after: list[int] = []
        while j < len(segments) and segments[j]["kind"] != "model":
            after += segments[j]["token_ids"]
            if tokens:
                token_spans += [(_decode(tokenizer, [t]), segments[j]["kind"])
                                for t in segments[j]["token_ids"]]  # fmt: skip
            j += 1
        k = len(turns)
        call = _call_view(calls[k]) if k < len(calls) else None
        markers = []
        if call is not None and not after:
            markers.append("the tool ran but its output did not fit in the context")
        turns.append(
            TurnView(
                index=k,
                text=_decode(tokenizer, model_ids, skip_special_tokens=False),
                tokens=len(model_ids),
                policy_version=turn_versions[0]
                if len(turn_versions) == 1
                else "→".join(map(str, turn_versions)),
                call=call,
                observation=_decode(tokenizer, after, skip_special_tokens=False) if after else None,
                markers=tuple(markers),
            )
        )
        i = j
    stop = row.get("stop_reason")
    episode_markers = []
    if stop in ("budget", "context"):
        what = "token budget" if stop == "budget" else "context limit"
        episode_markers.append(f"the response was cut: the episode reached its {what}")
    elif stop in ("max_turns", "deadline"):
        episode_markers.append(f"the episode stopped early ({stop})")
    if turns and episode_markers:
        turns[-1] = replace(turns[-1], markers=turns[-1].markers + tuple(episode_markers))
    info = row.get("info") or {}
    versions = tuple(s["policy_version"] for s in segments if s["kind"] == "model")
    return EpisodeView(
        index=index,
        prompt_id=row["prompt_id"],
        problem=problem_text(tokenizer, row["prompt_token_ids"]),
        gold=info.get("gold"),
        answer=row.get("answer"),
        verdict=row.get("verdict"),
        reason=info.get("verdict_reason"),
        reward=row.get("reward"),
        stop_reason=stop,
        turns=tuple(turns),
        tracker=tracker_view(row),
        policy_versions=versions,
        timings=dict(row.get("timings") or {}),
        source=dict(row.get("eval") or {}),
        tokens=tuple(token_spans),
        markers=tuple(episode_markers),
    )


@dataclass(frozen=True)
class Filters:
    """Which episodes the list shows; every given filter must match."""

    failed: bool = False  # reward is not 1 (wrong, no answer, or unscored)
    prompt: str | None = None  # prompt id (or the prompt's content key) equals this
    step: int | None = None  # training step
    verdict: str | None = None  # verifier status: correct, incorrect, no_answer, ...
    tool_error: bool = False  # at least one tool call with a fault

    def match(self, s: EpisodeSummary) -> bool:
        if self.failed and s.reward is not None and s.reward > 0:
            return False
        if self.prompt is not None and self.prompt not in (s.prompt_id, s.info.get("prompt_key")):
            return False
        if self.step is not None and (s.train or {}).get("step") != self.step:
            return False
        if self.verdict is not None and s.verdict != self.verdict:
            return False
        return not (self.tool_error and not s.faults)

    def describe(self) -> str:
        parts = [
            "failed" if self.failed else "",
            f"prompt {self.prompt}" if self.prompt is not None else "",
            f"step {self.step}" if self.step is not None else "",
            f"verdict {self.verdict}" if self.verdict is not None else "",
            "tool error" if self.tool_error else "",
        ]
        return ", ".join(p for p in parts if p) or "all episodes"


def summary_dict(s: EpisodeSummary) -> dict:
    """The list view's row for one episode (JSON-ready)."""
    return {
        "index": s.index,
        "prompt_id": s.prompt_id,
        "step": (s.train or {}).get("step"),
        "dataset": (s.eval or {}).get("dataset"),
        "sample": (s.eval or {}).get("sample"),
        "verdict": s.verdict,
        "reward": s.reward,
        "answer": s.answer,
        "gold": s.info.get("gold"),
        "turns": s.turns,
        "calls": len(s.tool_calls),
        "faults": list(s.faults),
        "stop_reason": s.stop_reason,
        "v_hat": (s.train or {}).get("v_hat"),
        "lag": (s.train or {}).get("lag"),
        "total_s": s.total_s,
    }
