"""The terminal viewer: a filtered list of episodes, and one episode turn by turn."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group
from rich.panel import Panel
from rich.rule import Rule
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from agent_spo.replay.episode import EpisodeView, TurnView

VERDICT_STYLE = {
    "correct": "green",
    "incorrect": "red",
    "no_answer": "yellow",
    "unparseable": "magenta",
    "timeout": "cyan",
}
TOKEN_STYLE = {  # two shades per kind, alternating, so token boundaries show
    "model": ("black on green3", "black on pale_green3"),
    "prompt": ("grey70 on grey19", "grey70 on grey27"),
    "tool": ("grey85 on dark_blue", "grey85 on blue3"),
    "template": ("grey70 on grey30", "grey70 on grey39"),
}


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _short(text: str | None, n: int = 24) -> str:
    if text is None:
        return "-"
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def list_table(rows: Sequence[dict], title: str) -> Table:
    """One line per episode: what happened and where to look."""
    table = Table(title=title, title_justify="left", expand=False)
    has_train = any(r["step"] is not None for r in rows)
    has_eval = any(r["dataset"] is not None for r in rows)
    table.add_column("#", justify="right")
    table.add_column("prompt")
    if has_eval:
        table.add_column("dataset / sample")
    if has_train:
        table.add_column("step", justify="right")
    table.add_column("verdict")
    table.add_column("answer")
    table.add_column("gold")
    table.add_column("turns", justify="right")
    table.add_column("calls", justify="right")
    table.add_column("faults")
    table.add_column("stop")
    if has_train:
        table.add_column("v̂", justify="right")
        table.add_column("lag", justify="right")
    table.add_column("s", justify="right")
    for r in rows:
        cells: list[str | Text] = [str(r["index"]), _short(r["prompt_id"], 28)]
        if has_eval:
            cells.append(f"{r['dataset']} / {r['sample']}" if r["dataset"] else "-")
        if has_train:
            cells.append(_num(r["step"]))
        cells += [
            Text(r["verdict"] or "-", style=VERDICT_STYLE.get(r["verdict"], "")),
            _short(r["answer"]),
            _short(r["gold"]),
            str(r["turns"]),
            str(r["calls"]),
            Text(",".join(r["faults"]) or "-", style="red" if r["faults"] else ""),
            r["stop_reason"] or "-",
        ]
        if has_train:
            cells += [_num(r["v_hat"], 2), _num(r["lag"])]
        cells.append(_num(r["total_s"], 2))
        table.add_row(*cells)
    return table


def _turn(turn: TurnView) -> Panel:
    parts: list = [Text(turn.text)]
    c = turn.call
    if c is not None:
        style = "red" if c.fault else "green"
        head = Text.assemble(
            ("tool call ", "bold"), (c.name, "bold cyan"), "  status ",
            (c.status or "not run", style), f"  fault {c.fault or '-'}",
            f"  latency {c.latency_s * 1000:.1f} ms",
            f" (sandbox {c.wall_s * 1000:.1f} ms)" if c.wall_s is not None else "",
        )  # fmt: skip
        parts += [Rule(style="dim"), head]
        if c.code is not None:
            lexer = "python" if c.name == "python" else "json"
            parts.append(Syntax(c.code, lexer, theme="ansi_dark", word_wrap=True))
        else:
            parts.append(Text("(the call could not be parsed; nothing ran)", style="yellow"))
        if c.stdout:
            parts += [Text("stdout", style="bold"), Text(c.stdout.rstrip("\n"))]
        if c.stderr:
            parts += [Text("stderr", style="bold"), Text(c.stderr.rstrip("\n"), style="red")]
        if c.exception:
            parts.append(Text(c.exception, style="red"))
        parts += [Text("the model saw", style="bold"), Text(c.observation, style="cyan")]
        for m in c.markers:
            parts.append(Text(f"✂ {m}", style="yellow"))
    for m in turn.markers:
        parts.append(Text(f"✂ {m}", style="yellow"))
    title = f"turn {turn.index + 1}: {turn.tokens} model tokens, policy v{turn.policy_version}"
    return Panel(Group(*parts), title=title, title_align="left")


def detail(view: EpisodeView, *, tokens: bool = False) -> Group:
    """One episode, turn by turn, with its verdict and tracker record."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    src = view.source
    head.add_row("episode", f"#{view.index}  prompt {view.prompt_id}"
                 + (f"  ({src['dataset']}, sample {src['sample']})" if src else ""))  # fmt: skip
    head.add_row("problem", _short(view.problem, 400))
    head.add_row("gold", view.gold or "-")
    head.add_row("answer", view.answer or "-")
    head.add_row(
        "verdict",
        Text.assemble((view.verdict or "-", VERDICT_STYLE.get(view.verdict or "", "")),
                      f"  {view.reason or ''}", f"  reward {_num(view.reward, 1)}"),
    )  # fmt: skip
    head.add_row("stop", view.stop_reason or "-")
    t = view.tracker
    if t.step is not None or t.v_hat_before is not None:
        adv = _num(t.adv) if t.adv is not None else f"raw {_num(t.adv_raw)}"
        head.add_row(
            "tracker",
            f"step {_num(t.step)}  v̂ before {_num(t.v_hat_before)}  v̂ after "
            f"{_num(t.v_hat_after)}  advantage {adv}  policy lag {_num(t.lag)}",
        )
    if t.note:
        head.add_row("", Text(t.note, style="dim"))
    head.add_row("policy", "versions " + (", ".join(map(str, view.policy_versions)) or "-"))
    times = "  ".join(f"{k} {v:.3f}" for k, v in view.timings.items())
    head.add_row("timings", times or "-")
    parts: list = [head, *(_turn(turn) for turn in view.turns)]
    for m in view.markers:
        parts.append(Text(f"✂ {m}", style="yellow"))
    if tokens:
        parts.append(token_text(view))
    return Group(*parts)


def token_text(view: EpisodeView) -> Panel:
    """Every token, coloured by whether the loss trains on it."""
    text = Text()
    flip: dict[str, int] = {}
    for piece, kind in view.tokens:
        shade = flip.get(kind, 0)
        flip[kind] = 1 - shade
        text.append(piece, style=TOKEN_STYLE.get(kind, TOKEN_STYLE["template"])[shade])
    n_model = sum(kind == "model" for _, kind in view.tokens)
    legend = Text.assemble(
        ("trainable (model)", TOKEN_STYLE["model"][0]), "  ",
        ("masked: prompt", TOKEN_STYLE["prompt"][0]), "  ",
        ("masked: tool", TOKEN_STYLE["tool"][0]), "  ",
        ("masked: template", TOKEN_STYLE["template"][0]),
        f"   {n_model} of {len(view.tokens)} tokens trainable",
    )  # fmt: skip
    return Panel(Group(legend, text), title="tokens", title_align="left")


def print_detail(console: Console, view: EpisodeView, *, tokens: bool = False) -> None:
    console.print(detail(view, tokens=tokens))
