"""`agent-spo replay`: list logged episodes, or show one turn by turn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent_spo.cli.args import fail, stderr, stdout


def replay(
    episodes: Annotated[
        Path,
        typer.Argument(
            help="Episode log (RUN_DIR/episodes.jsonl, a rollout or eval log) or the "
            "run/eval directory that holds it."
        ),
    ],
    episode: Annotated[
        str | None,
        typer.Argument(
            help="Episode number (the list's # column); omitted: list the episodes.",
            show_default=False,
        ),
    ] = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="List only episodes whose reward is not 1.")
    ] = False,
    prompt: Annotated[
        str | None, typer.Option(help="List only this prompt id (or prompt key).")
    ] = None,
    step: Annotated[int | None, typer.Option(help="List only this training step.")] = None,
    verdict: Annotated[
        str | None,
        typer.Option(help="List only this verdict: correct, incorrect, no_answer, ..."),
    ] = None,
    tool_error: Annotated[
        bool, typer.Option("--tool-error", help="List only episodes with a faulty tool call.")
    ] = False,
    limit: Annotated[
        int, typer.Option(help="Most episodes listed (and put in --html).", min=1)
    ] = 50,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="Colour every token: trainable vs masked.")
    ] = False,
    rerun: Annotated[
        bool,
        typer.Option("--rerun", help="Re-execute the tool calls in a fresh sandbox and re-verify."),
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option(help="Also write the views as one self-contained HTML page here."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model (tokenizer) directory. Default: from config.yaml beside the log, "
            "else the demo model."
        ),
    ] = None,
) -> None:
    """Show logged episodes: a filtered list, or one episode turn by turn.

    The detail view prints each turn's model text, tool calls with their code, the typed
    sandbox result and latency, truncation markers, the final answer, the verdict and its
    reason, the tracker value before and after, the advantage and the policy-version lag.
    --rerun re-runs the tool calls in a fresh sandbox session and re-verifies the answer,
    reporting any difference from the log.

    Examples: `agent-spo replay runs/demo --failed --step 3`;
    `agent-spo replay runs/demo 17 --tokens --rerun`; `agent-spo replay runs/demo --html page.html`
    """
    from agent_spo.replay.command import ReplayError, run_replay
    from agent_spo.replay.episode import Filters

    filters = Filters(failed=failed, prompt=prompt, step=step, verdict=verdict,
                      tool_error=tool_error)  # fmt: skip
    try:
        run_replay(
            episodes, episode, filters=filters, limit=limit, tokens=tokens, rerun=rerun,
            html_out=html, model=model, console=stdout, err=stderr,
        )  # fmt: skip
    except ReplayError as e:
        fail(str(e))
