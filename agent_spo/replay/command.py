"""`agent-spo replay`: find the log, pick episodes, show them, re-run one, write HTML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent_spo.episode.log import EpisodeLog, EpisodeLogError, EpisodeSummary
from agent_spo.replay.episode import Filters, episode_view, summary_dict

LOG_NAMES = ("episodes.jsonl", "rollout.jsonl", "held_out.jsonl")


class ReplayError(ValueError):
    """Bad input for replay (no log, no such episode); the message says which."""


def resolve_log(path: Path) -> Path:
    """A log file, or the run/eval directory holding one (episodes.jsonl first)."""
    if path.is_dir():
        for name in LOG_NAMES:
            if (path / name).is_file():
                return path / name
        raise ReplayError(f"{path} holds no episode log (looked for {', '.join(LOG_NAMES)})")
    if not path.exists():
        raise ReplayError(f"episode log not found: {path}")
    return path


@dataclass
class Context:
    """What the log was made with: model (tokenizer) and the rollout/sandbox/verifier."""

    model_path: str
    rollout: object
    sandbox: object
    verifier: object
    source: str  # where the settings came from, for the header
    reward: Any = None  # the run's RewardConfig (extra reward conditions)


def load_context(log: Path, model: str | None, *, log_fn=print) -> Context:
    """Settings from config.yaml beside the log (train or eval), else the defaults."""
    import yaml

    from agent_spo import builders
    from agent_spo.config import ModelConfig, RolloutConfig, SandboxConfig, VerifierConfig
    from agent_spo.config.schema import RewardConfig

    cfg_path = log.parent / "config.yaml"
    raw: dict = {}
    source = "defaults (no config.yaml beside the log)"
    if cfg_path.is_file():
        raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        source = str(cfg_path)
    try:
        rollout = RolloutConfig.model_validate(raw.get("rollout") or {})
        sandbox = SandboxConfig.model_validate(raw.get("sandbox") or {})
        verifier = VerifierConfig.model_validate(raw.get("verifier") or {})
        model_cfg = ModelConfig.model_validate(raw.get("model") or {})
        reward = RewardConfig.model_validate(raw.get("reward") or {})
    except ValueError as e:
        raise ReplayError(f"{cfg_path}: not a usable config ({e})") from None
    if model is not None:
        model_cfg = model_cfg.model_copy(update={"path": model})
        source += f"; model {model}"
    try:
        model_path = builders.resolve_model_path(model_cfg, log=log_fn, rollout=rollout)
    except builders.ModelPathError as e:
        raise ReplayError(str(e)) from None
    return Context(model_path, rollout, sandbox, verifier, source, reward)


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def select(log: EpisodeLog, filters: Filters, limit: int) -> tuple[list[EpisodeSummary], int]:
    """The first `limit` matching summaries and the number of matches, in one pass."""
    shown: list[EpisodeSummary] = []
    total = 0
    for s in log.summaries():
        if filters.match(s):
            total += 1
            if len(shown) < limit:
                shown.append(s)
    return shown, total


def parse_episode(text: str) -> int:
    t = text.lstrip("#")
    if not t.isdigit():
        raise ReplayError(f"EPISODE is the number in the list's # column, got {text!r}")
    return int(t)


def run_replay(
    episodes: Path,
    episode: str | None,
    *,
    filters: Filters,
    limit: int,
    tokens: bool,
    rerun: bool,
    html_out: Path | None,
    model: str | None,
    console: Console,
    err: Console,
) -> None:
    """The whole command; raises ReplayError for bad input."""
    path = resolve_log(episodes)
    if not console.is_terminal:  # piped: room for every column of the list
        console.width = max(console.width, 160)
    try:
        log = EpisodeLog(path, warn=lambda m: err.print(Text(f"warning: {m}", style="yellow")))
    except EpisodeLogError as e:
        raise ReplayError(str(e)) from None
    if episode is None and (tokens or rerun):
        raise ReplayError("--tokens and --rerun need an EPISODE (a number from the list)")
    if episode is not None:
        try:
            row = log.get(parse_episode(episode))
        except EpisodeLogError as e:
            raise ReplayError(str(e)) from None
        ctx = load_context(path, model, log_fn=lambda m: err.print(m))
        tokenizer = _tokenizer(ctx.model_path)
        view = episode_view(row.data, tokenizer, row.index, tokens=tokens or html_out is not None)
        from agent_spo.replay.terminal import print_detail

        print_detail(console, view, tokens=tokens)
        if rerun:
            _rerun(row.data, ctx, tokenizer, console, err)
        if html_out is not None:
            from agent_spo.replay.html import write_page

            summary = next(s for s in log.summaries() if s.index == row.index)
            write_page(html_out, title=f"replay: {path.name} #{row.index}",
                       subtitle=f"{path} (settings: {ctx.source})",
                       rows=[summary_dict(summary)], episodes=[view])  # fmt: skip
            err.print(f"wrote {html_out}")
        return

    shown, total = select(log, filters, limit)
    rows = [summary_dict(s) for s in shown]
    from agent_spo.replay.terminal import list_table

    skipped = log.report.skipped
    title = (f"{path}: {total} episodes match ({filters.describe()})"
             + (f", showing the first {len(rows)}" if total > len(rows) else ""))  # fmt: skip
    console.print(list_table(rows, title))
    if skipped:
        err.print(Text(f"{skipped} line(s) of the log were skipped (see warnings)", style="yellow"))
    if html_out is not None:
        from agent_spo.replay.html import write_page

        ctx = load_context(path, model, log_fn=lambda m: err.print(m))
        tokenizer = _tokenizer(ctx.model_path)
        views = [
            episode_view(log.read_at(s.offset), tokenizer, s.index, tokens=True) for s in shown
        ]
        write_page(html_out, title=f"replay: {path.name}",
                   subtitle=f"{path}: {total} episodes match ({filters.describe()}); "
                   f"{len(rows)} on this page; settings: {ctx.source}",
                   rows=rows, episodes=views)  # fmt: skip
        err.print(f"wrote {html_out} ({len(views)} episodes)")


def _rerun(row: dict, ctx: Context, tokenizer, console: Console, err: Console) -> None:
    """Re-execute the tool calls and the verification; print what differs."""
    import asyncio

    from agent_spo import builders
    from agent_spo.episode.rules import RewardRules
    from agent_spo.replay.rerun import rerun_episode

    async def go():
        toolbox = builders.build_toolbox(ctx.rollout)
        renderer = builders.build_renderer(tokenizer, ctx.rollout, toolbox)
        with builders.build_verifier(ctx.verifier) as verifier:
            async with builders.build_sandbox(ctx.sandbox, ctx.rollout) as sandbox:
                return await rerun_episode(
                    row, toolbox=toolbox, renderer=renderer, sandbox=sandbox,
                    verifier=verifier, tool_timeout_s=ctx.sandbox.timeout_s,
                    rules=RewardRules(**ctx.reward.model_dump()),
                )  # fmt: skip

    report = asyncio.run(go())
    table = Table(title="re-run: tool calls in a fresh sandbox session, answer re-verified",
                  title_justify="left")  # fmt: skip
    for col in ("", "logged", "now", "same"):
        table.add_column(col)
    for c in report.calls:
        mark = Text("yes", style="green") if c.same else Text("NO", style="bold red")
        if not c.ran:
            mark = Text("not run (malformed call)", style="dim")
        table.add_row(
            f"call {c.index + 1} {c.name} status", str(c.status[0]), str(c.status[1]), mark
        )
        if c.ran and c.observation[0] != c.observation[1]:
            table.add_row("  output", c.observation[0][:200], c.observation[1][:200], "")
        if c.ran:
            table.add_row("  latency", f"{c.latency_s[0] * 1000:.1f} ms",
                          f"{c.latency_s[1] * 1000:.1f} ms", "")  # fmt: skip
    for label, pair in (("verdict", report.verdict), ("reward", report.reward),
                        ("answer", report.answer), ("reason", report.reason)):  # fmt: skip
        same = pair[0] == pair[1]
        table.add_row(label, str(pair[0]), str(pair[1]),
                      Text("yes", style="green") if same else Text("NO", style="bold red"))  # fmt: skip
    console.print(table)
    if not report.verified:
        err.print(Text("the answer was not re-verified: the episode has none to check "
                       "(deadline, or no gold in the log)", style="yellow"))  # fmt: skip
    diffs = report.differences
    if diffs:
        console.print(Text(f"{len(diffs)} difference(s) from the log:", style="bold red"))
        for d in diffs:
            console.print(f"  - {d}")
    else:
        console.print(Text("no differences from the log", style="bold green"))
