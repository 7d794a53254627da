"""`agent-spo bench verify`: accuracy and speed of our verifier, beside math-verify.

Two kinds of workload, each run by both verifiers with the same number of worker
processes and a hard per-call wall clock:

- the labelled set (tests/verify/cases.jsonl): accuracy, false positives (said correct,
  labelled false), false negatives, timeouts, per answer type and per category;
- throughput sets: `integer` (AIME/DAPO-style integer golds, a ~1.5 kB reasoning text
  ending in a box, half right) and `latex` (MATH-500 non-integer golds, boxed as
  written or with one digit changed). Latency is the per-call time measured inside the
  worker (median, p99); checks/s is calls divided by the wall time of the whole batch.
  The latex pairs are all distinct, so the parse caches serve none of them; the set
  `latex-parsed` is its wrong half alone, where both sides must go through the parser.

math-verify runs through `mathverify_runner.py` under another Python (its own venv),
so its dependencies never enter this environment.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from agent_spo.verify.pool import VerifierPool

RUNNER = Path(__file__).with_name("mathverify_runner.py")
_REASONING = (
    "Let us set up the problem carefully. We denote the unknown quantity by $n$ and write "
    "the conditions as equations. From the first condition, $3n + 7 \\equiv 1 \\pmod{9}$, "
    "so $3n \\equiv 3 \\pmod 9$ and $n \\equiv 1 \\pmod 3$. The second condition gives "
    "$n^2 - 5n + 6 = (n-2)(n-3)$, which must be divisible by $4$. Checking residues "
    "modulo $12$: $n = 1$ gives $2$, $n = 4$ gives $2$, $n = 7$ gives $20$, and $n = 10$ "
    "gives $56$. Hence $n \\equiv 7$ or $10 \\pmod{12}$. Summing over the admissible "
    "values below the bound, we use the formula $\\sum_{k=0}^{m} (12k + r) = 12 \\cdot "
    "\\frac{m(m+1)}{2} + (m+1) r$. Substituting and simplifying, the two residue classes "
    "contribute $\\frac{12 \\cdot 82 \\cdot 83}{2} + 83 \\cdot 7$ and a similar term. "
) * 2


@dataclass
class Run:
    """One verifier on one workload: verdicts and timings."""

    verdicts: list[bool] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def speed(run: Run) -> dict:
    """Latency percentiles (per call, inside the worker) and checks per second."""
    return {
        "n": len(run.latencies_s),
        "median_ms": 1000 * statistics.median(run.latencies_s) if run.latencies_s else None,
        "p99_ms": 1000 * _pct(run.latencies_s, 0.99),
        "max_ms": 1000 * max(run.latencies_s) if run.latencies_s else None,
        "checks_per_s": len(run.latencies_s) / run.wall_s if run.wall_s else None,
        "timeouts": sum(s == "timeout" for s in run.statuses),
    }


def accuracy(cases: list[dict], run: Run) -> dict:
    """Accuracy, false positives and false negatives, overall and per group."""

    def score(idx: list[int]) -> dict:
        fp = sum(run.verdicts[i] and not cases[i]["label"] for i in idx)
        fn = sum(not run.verdicts[i] and cases[i]["label"] for i in idx)
        return {
            "n": len(idx),
            "accuracy": (len(idx) - fp - fn) / len(idx) if idx else None,
            "fp": fp,
            "fn": fn,
            "timeouts": sum(run.statuses[i] == "timeout" for i in idx),
        }

    out = {"all": score(list(range(len(cases))))}
    for key in ("answer_type", "category"):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(cases):
            groups[c[key]].append(i)
        out[key] = {g: score(idx) for g, idx in sorted(groups.items())}
    return out


def run_ours(pairs: list[tuple[str, str]], workers: int, timeout_s: float) -> Run:
    """Our verifier on the pairs, in a fresh pool (cold caches)."""
    with VerifierPool(workers=workers, timeout_s=timeout_s) as pool:
        pool.check_many(pairs[: 2 * workers])  # the first calls pay for thread start-up
        start = time.perf_counter()
        verdicts = pool.check_many(pairs)
        wall = time.perf_counter() - start
    return Run(
        [v.correct for v in verdicts],
        [v.status for v in verdicts],
        [v.elapsed_s for v in verdicts],
        wall,
    )


def run_mathverify(
    pairs: list[tuple[str, str]], python: str, workers: int, timeout_s: float
) -> Run:
    """math-verify on the pairs, through mathverify_runner.py under its own Python."""
    request = json.dumps({"pairs": pairs, "workers": workers, "timeout_s": timeout_s})
    proc = subprocess.run(
        [python, str(RUNNER)],
        input=request,
        capture_output=True,
        text=True,
        timeout=60 + len(pairs) * (timeout_s + 1),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"math-verify runner failed: {proc.stderr[-2000:]}")
    run = Run()
    for line in proc.stdout.splitlines():
        row = json.loads(line)
        if "wall_s" in row:
            run.wall_s = row["wall_s"]
        else:
            run.verdicts.append(bool(row["correct"]))
            run.statuses.append(row["status"])
            run.latencies_s.append(row["elapsed_s"])
    return run


def _perturb(answer: str) -> str:
    m = re.search(r"\d", answer)
    if not m:
        return answer + "+1"
    i = m.start()
    return answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1 :]


def throughput_sets(data_dir: Path | None, n_integer: int, n_latex: int, seed: int = 0):
    """(name, pairs) workloads; golds from shared data when present, else synthetic."""
    rng = random.Random(seed)
    integer_golds: list[str] = []
    latex_golds: list[str] = []
    if data_dir is not None:
        dapo = data_dir / "dapo_math_17k" / "dapo_math_17k.jsonl"
        if dapo.is_file():
            integer_golds = [json.loads(line)["answer"] for line in dapo.open()]
        math500 = data_dir / "math500" / "math500.jsonl"
        if math500.is_file():
            latex_golds = [
                a
                for a in (json.loads(line)["answer"] for line in math500.open())
                if not re.fullmatch(r"-?\d+", a)
            ]
    if not integer_golds:
        integer_golds = [str(rng.randint(0, 999)) for _ in range(1000)]
    if not latex_golds:
        latex_golds = ["\\frac{1}{2}", "2\\sqrt{3}", "\\left(3, \\frac{\\pi}{2}\\right)", "[-2, 4)"]
    integer = []
    for k in range(n_integer):
        gold = rng.choice(integer_golds)
        answer = gold if k % 2 == 0 else str(int(gold) + rng.randint(1, 9))
        integer.append((gold, f"{_REASONING}Therefore the answer is $\\boxed{{{answer}}}$."))
    # Every latex pair is distinct, so no call is served by the parse caches.
    latex = []
    for gold in dict.fromkeys(latex_golds):
        for answer in (gold, _perturb(gold)):
            latex.append((gold, f"So the final answer is $\\boxed{{{answer}}}$."))
    rng.shuffle(latex)
    latex = latex[:n_latex]
    # The wrong half alone: both sides must be parsed (no same-text shortcut).
    latex_parsed = [(g, r) for g, r in latex if f"{{{g}}}$" not in r]
    return [("integer", integer), ("latex", latex), ("latex-parsed", latex_parsed)]


def run_bench(
    cases_path: Path,
    data_dir: Path | None,
    workers: int,
    timeout_s: float,
    mathverify_python: str | None,
    mv_timeout_s: float,
    n_integer: int,
    n_latex: int,
    on_stage=lambda name: None,
) -> dict:
    """Run every workload with ours (and math-verify when its Python is given)."""
    cases = [json.loads(line) for line in cases_path.read_text().split("\n") if line.strip()]
    pairs = [(c["gold"], c["response"]) for c in cases]
    report: dict = {
        "workers": workers,
        "timeout_s": timeout_s,
        "mathverify_timeout_s": mv_timeout_s,
        "cases": str(cases_path),
        "n_cases": len(cases),
        "verifiers": {},
    }
    verifiers = [("ours", lambda p: run_ours(p, workers, timeout_s))]
    if mathverify_python:
        verifiers.append(
            ("math-verify", lambda p: run_mathverify(p, mathverify_python, workers, mv_timeout_s))
        )
    per_case: dict[str, Run] = {}
    for name, runner in verifiers:
        on_stage(f"{name}: labelled set")
        run = runner(pairs)
        per_case[name] = run
        entry = {"labelled": {**accuracy(cases, run), "speed": speed(run)}, "throughput": {}}
        for set_name, set_pairs in throughput_sets(data_dir, n_integer, n_latex):
            on_stage(f"{name}: {set_name} throughput")
            entry["throughput"][set_name] = speed(runner(set_pairs))
        report["verifiers"][name] = entry
    report["per_case"] = [
        {
            "id": c["id"],
            "label": c["label"],
            **{f"{name}": run.verdicts[i] for name, run in per_case.items()},
            **{f"{name}_status": run.statuses[i] for name, run in per_case.items()},
            **{f"{name}_ms": round(1000 * run.latencies_s[i], 3) for name, run in per_case.items()},
        }
        for i, c in enumerate(cases)
    ]
    return report


def default_inputs(
    cases: Path | None, data: Path | None, mathverify_python: str | None
) -> tuple[Path, Path | None, str | None]:
    """The checkout's defaults: tests/verify/cases.jsonl, ../shared/data beside the
    checkout when present, and .venv-mathverify/bin/python when it was installed."""
    root = Path(__file__).resolve().parents[2]
    cases = cases or root / "tests" / "verify" / "cases.jsonl"
    if data is None and (root.parent / "shared" / "data").is_dir():
        data = root.parent / "shared" / "data"
    default_mv = root / ".venv-mathverify" / "bin" / "python"
    if mathverify_python is None and default_mv.exists():
        mathverify_python = str(default_mv)
    return cases, data, mathverify_python


def write_report(report: dict, out: Path) -> None:
    """summary.json (the report without per-case rows) and per_case.jsonl under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in report.items() if k != "per_case"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "per_case.jsonl").open("w") as f:
        for row in report["per_case"]:
            f.write(json.dumps(row) + "\n")


def tables(report: dict) -> list:
    """Rich tables: the labelled set, accuracy per answer type, and throughput."""
    from rich.table import Table

    names = list(report["verifiers"])
    workers = report["workers"]

    def fmt(x, digits=1):
        if x is None:
            return "-"
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)

    labelled = Table(title=f"labelled set: {report['n_cases']} cases, {workers} workers")
    labelled.add_column("metric")
    for n in names:
        labelled.add_column(n, justify="right")
    rows = [
        ("accuracy", lambda e: fmt(e["labelled"]["all"]["accuracy"], 3)),
        ("false positives", lambda e: fmt(e["labelled"]["all"]["fp"])),
        ("false negatives", lambda e: fmt(e["labelled"]["all"]["fn"])),
        ("timeouts", lambda e: fmt(e["labelled"]["all"]["timeouts"])),
        ("median ms", lambda e: fmt(e["labelled"]["speed"]["median_ms"], 2)),
        ("p99 ms", lambda e: fmt(e["labelled"]["speed"]["p99_ms"], 1)),
        ("max ms", lambda e: fmt(e["labelled"]["speed"]["max_ms"], 1)),
        ("checks/s", lambda e: fmt(e["labelled"]["speed"]["checks_per_s"], 0)),
    ]
    for label, get in rows:
        labelled.add_row(label, *(get(report["verifiers"][n]) for n in names))

    types = Table(title="per answer type: accuracy (FP/FN)")
    types.add_column("answer type")
    types.add_column("n", justify="right")
    for n in names:
        types.add_column(n, justify="right")
    first = report["verifiers"][names[0]]["labelled"]["answer_type"]
    for kind, row in first.items():
        cells = []
        for n in names:
            r = report["verifiers"][n]["labelled"]["answer_type"][kind]
            cells.append(f"{r['accuracy']:.2f} ({r['fp']}/{r['fn']})")
        types.add_row(kind, str(row["n"]), *cells)

    speed_table = Table(title=f"throughput ({workers} workers; latency measured inside the worker)")
    speed_table.add_column("set")
    speed_table.add_column("metric")
    for n in names:
        speed_table.add_column(n, justify="right")
    for set_name in report["verifiers"][names[0]]["throughput"]:
        for metric, digits in (("n", 0), ("median_ms", 3), ("p99_ms", 2), ("checks_per_s", 0),
                               ("timeouts", 0)):  # fmt: skip
            speed_table.add_row(
                set_name, metric,
                *(fmt(report["verifiers"][n]["throughput"][set_name][metric], digits)
                  for n in names),
            )  # fmt: skip
    return [labelled, types, speed_table]
