"""`agent-spo verify`: check answers with the training verifier."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from agent_spo.cli.args import fail, stderr, stdout

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogates(text: str) -> str:
    """Lone surrogates (from malformed input; UTF-8 cannot encode them) as \\uXXXX."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _json_line(record: dict) -> str:
    """One line of JSON that is valid UTF-8: other non-ASCII text stays as it is, and a
    lone surrogate becomes a \\uXXXX escape, which json.loads reads back unchanged."""
    return _escape_surrogates(json.dumps(record, ensure_ascii=False))


def verify(
    gold: Annotated[
        str | None,
        typer.Argument(help="Gold (reference) answer, e.g. '\\frac{1}{2}'.", show_default=False),
    ] = None,
    response: Annotated[
        str | None,
        typer.Argument(
            help="Model response or bare answer; the final \\boxed{…}, 'Answer:' line, etc. "
            "is extracted.",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="JSONL with one {gold, response} object per line (id and label optional); "
            "checks every line.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print verdicts as JSON.")] = False,
    timeout: Annotated[
        float, typer.Option(help="Wall-clock limit per check, in seconds.", min=0.01)
    ] = 2.0,
    workers: Annotated[int, typer.Option(help="Worker processes for --file.", min=1)] = 2,
) -> None:
    """Check a response against a gold answer with the training verifier.

    Prints the verdict (correct, incorrect, no_answer, unparseable or timeout), the
    reason, the extracted answer and both parsed forms. Every check runs in a killable
    worker process with a wall clock, as in training.

    Examples: `agent-spo verify '\\frac{1}{2}' 'so the answer is \\boxed{0.5}'`;
    `agent-spo verify --file cases.jsonl --json`
    """
    from agent_spo.verify import VerifierPool

    if (file is None) == (gold is None or response is None) or (file and (gold or response)):
        fail("give GOLD and RESPONSE, or --file CASES.jsonl (not both)")
    if file is None:
        assert gold is not None and response is not None  # checked above
        with VerifierPool(workers=1, timeout_s=timeout) as pool:
            v = pool.check(gold, response)
        if as_json:
            typer.echo(_json_line(v.as_dict()))
            return
        style = {"correct": "green", "timeout": "yellow"}.get(v.status, "red")
        stdout.print(
            Text(v.status, style=f"bold {style}"), Text(f"  {_escape_surrogates(v.reason)}")
        )
        for label, value in (
            ("extracted", v.prediction),
            ("found by", v.how),
            ("prediction", v.pred_parsed),
            ("gold", v.gold_parsed),
            ("reward", v.reward if v.reward is not None else "not scorable"),
            ("time", f"{v.elapsed_s * 1000:.1f} ms"),
        ):
            typer.echo(_escape_surrogates(f"{label:>11}: {value}"))
        return

    from agent_spo.verify.cases import CasesFileError, check_file

    try:
        report = check_file(file, workers=workers, timeout_s=timeout)
    except CasesFileError as e:
        fail(f"--file {e}")
    for i, (row, v) in enumerate(zip(report.rows, report.verdicts, strict=True)):
        name = row.get("id", i)
        if as_json:
            extra = {"label": row["label"]} if "label" in row else {}
            typer.echo(_json_line({"id": name, **extra, **v.as_dict()}))
        else:
            typer.echo(_escape_surrogates(f"{name}\t{v.status}\t{v.reason}"))
    stderr.print(f"{len(report.verdicts)} checks: {report.summary()}", soft_wrap=True)
