"""`agent-spo eval`: sample n episodes per benchmark problem, then score them.

    OUT/config.yaml      the resolved eval config (a resume must match its sample settings)
    OUT/episodes.jsonl   one trajectory per finished sample, with an `eval` object
                         {dataset, problem_id, sample}; the input of `agent-spo replay`
    OUT/dropped.jsonl    samples the infrastructure failed (retried on the next run)
    OUT/results.json     per-dataset and mean metrics, per-problem detail
    OUT/results.md       the same tables in Markdown

Sampling and scoring are separate passes over the log, so an interrupted evaluation
resumes where it stopped: finished samples are read back, never regenerated, and only
the missing ones are sampled. Every sample has its own seed (from run.seed, dataset,
problem and sample index), so a resumed evaluation draws what an uninterrupted one would
have drawn, where the engine honours per-request seeds.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_spo.data.problems import Problem, load_problems
from agent_spo.episode.log import EpisodeLog, append_row, open_for_append
from agent_spo.episode.pool import EpisodeJob, Outcome, drop_cause, episode_seed, play
from agent_spo.evaluate.config import EvalConfig, dump_eval_config, sample_settings
from agent_spo.evaluate.metrics import (
    avg_at_k,
    cluster_answers,
    maj_at_k,
    maj_is_exact,
    pass_at_k,
)


class EvalMismatch(ValueError):
    """The output directory holds samples drawn with other settings; names the keys."""


@dataclass
class Sample:
    reward: float  # 0.0 for unscored and dropped samples; they are counted apart
    answer: str | None
    verdict: str | None


@dataclass
class Progress:
    """What the progress callback sees."""

    total: int = 0  # samples to generate in this session
    done: int = 0
    dropped: int = 0
    drop_causes: Counter = field(default_factory=Counter)  # drop_cause -> samples
    correct: int = 0
    dataset: str = ""
    per_dataset_s: dict[str, list[float]] = field(default_factory=dict)  # first start, last end


def check_resume(cfg: EvalConfig, out_dir: Path) -> None:
    """Refuse to mix samples drawn under different settings into one evaluation."""
    saved = out_dir / "config.yaml"
    if not saved.exists():
        return
    import yaml
    from pydantic import ValidationError

    try:
        old = EvalConfig.model_validate(yaml.safe_load(saved.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError) as e:
        raise EvalMismatch(
            f"{saved} is not a readable eval config ({e}); use another run.name"
        ) from None
    a, b = sample_settings(old), sample_settings(cfg)
    diff = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    if diff:
        raise EvalMismatch(
            f"{out_dir} holds samples drawn with other settings ({'; '.join(diff)}); "
            "use another run.name, or delete the directory to start over"
        )


def finished_samples(path: Path, warn=None) -> set[tuple[str, str, int]]:
    """(dataset, problem id, sample) of every sample already in the log."""
    if not path.exists():
        return set()
    done = set()
    for s in EpisodeLog(path, warn=warn).summaries():
        if s.eval:
            done.add((s.eval["dataset"], s.eval["problem_id"], int(s.eval["sample"])))
    return done


def load_datasets(cfg: EvalConfig) -> list[tuple[str, list[Problem]]]:
    return [
        (d.label, list(load_problems(d.resolved(), cfg.eval.max_problems).problems))
        for d in cfg.eval.datasets
    ]


async def generate(
    cfg: EvalConfig,
    out_dir: Path,
    datasets: list[tuple[str, list[Problem]]],
    *,
    verifier,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
    engine=None,
) -> Progress:
    """Sample every missing (dataset, problem, sample) and append it to the log.

    `engine`: an engine to use instead of building one from the config (tests, or a
    server already running); it is closed at the end like a built one.
    """
    from agent_spo import builders

    episodes = out_dir / "episodes.jsonl"
    done = finished_samples(episodes, warn=log)
    jobs = [  # each sample's seed depends on what it is, so a resume draws the same
        EpisodeJob(
            prob,
            episode_seed(cfg.run.seed, name, prob.id, s),
            {"dataset": name, "problem_id": prob.id, "sample": s},
        )  # fmt: skip
        for name, problems in datasets
        for prob in problems
        for s in range(cfg.eval.n)
        if (name, prob.id, s) not in done
    ]
    state = Progress(total=len(jobs))
    if done:
        log(f"resuming: {len(done)} samples already in {episodes}; {len(jobs)} to generate")
    if not jobs:
        return state
    elog, fixed = open_for_append(episodes)
    dlog = open(out_dir / "dropped.jsonl", "a", encoding="utf-8")
    if fixed:
        log(f"{episodes}: {fixed}")

    def record(o: Outcome) -> None:
        name = o.job.info["dataset"]
        span = state.per_dataset_s[name]
        if o.dropped is not None:
            state.dropped += 1
            state.drop_causes[drop_cause(o.dropped)] += 1
            append_row(dlog, json.dumps({**o.job.info, "source": o.dropped.source,
                                         "reason": o.dropped.reason}))  # fmt: skip
        else:
            traj = o.trajectory
            assert traj is not None  # an outcome has its trajectory or why it was dropped
            append_row(elog, traj.to_json()[:-1] + ', "eval": ' + json.dumps(o.job.info) + "}")
            state.correct += int((traj.reward or 0) > 0)
        span[1] = time.time()
        state.done += 1
        state.dataset = name
        if progress is not None:
            progress(state)

    def start(job: EpisodeJob) -> None:
        now = time.time()
        state.per_dataset_s.setdefault(job.info["dataset"], [now, now])

    try:
        async with builders.open_episode_runner(
            cfg, log=log, verifier=verifier, engine=engine
        ) as runner:
            await play(runner, jobs, workers=cfg.rollout.workers, on_outcome=record,
                       on_start=start)  # fmt: skip
    finally:
        elog.close()
        dlog.close()
    return state


def _equivalent(verifier) -> Callable[[str, str], bool]:
    """Answer equivalence for maj@k: the verifier with one answer as the gold."""

    def same(rep: str, answer: str) -> bool:
        return bool(verifier.check(rep, "\\boxed{" + answer + "}").correct)

    return same


def score(
    cfg: EvalConfig,
    out_dir: Path,
    datasets: list[tuple[str, list[Problem]]],
    *,
    verifier,
    log: Callable[[str], None] = print,
    wall: dict[str, float] | None = None,
) -> dict:
    """Read the log back and compute every metric; returns the results mapping."""
    n, ks = cfg.eval.n, cfg.eval.ks
    wanted = {name: {p.id for p in problems} for name, problems in datasets}
    got: dict[tuple[str, str], dict[int, Sample]] = {}
    unscored: dict[str, int] = {}
    path = out_dir / "episodes.jsonl"
    if path.exists():
        for s in EpisodeLog(path, warn=log).summaries():
            e = s.eval or {}
            name, pid, i = e.get("dataset"), e.get("problem_id"), int(e.get("sample", -1))
            if name not in wanted or pid not in wanted[name] or not 0 <= i < n:
                continue
            if s.reward is None:
                unscored[name] = unscored.get(name, 0) + 1
            got.setdefault((name, pid), {})[i] = Sample(s.reward or 0.0, s.answer, s.verdict)
    same = _equivalent(verifier)
    results: dict = {"n": n, "k": ks, "datasets": {}, "mean": {}}
    for name, problems in datasets:
        per_problem, dropped, no_answer = [], 0, 0
        for prob in problems:
            have = got.get((name, prob.id), {})
            samples = [have.get(i, Sample(0.0, None, "dropped")) for i in range(n)]
            dropped += n - len(have)
            rewards = [x.reward for x in samples]
            answers = [x.answer for x in samples]
            no_answer += sum(a is None for a in answers)
            c = sum(r > 0 for r in rewards)
            clusters = cluster_answers(answers, rewards, same)
            row: dict[str, Any] = {
                "id": prob.id,
                "correct": c,
                "answers": len({x for x in clusters if x is not None}),
            }
            for k in ks:
                row[f"avg@{k}"] = avg_at_k(rewards, k)
                row[f"pass@{k}"] = pass_at_k(n, c, k)
                row[f"maj@{k}"], _ = maj_at_k(
                    clusters, rewards, k, exact_limit=cfg.eval.maj_exact_limit,
                    resamples=cfg.eval.maj_resamples, seed=cfg.run.seed,
                )  # fmt: skip
            per_problem.append(row)
        metrics = {
            m: sum(r[m] for r in per_problem) / len(per_problem)
            for m in (f"{kind}@{k}" for kind in ("avg", "pass", "maj") for k in ks)
        }
        results["datasets"][name] = {
            "problems": len(problems),
            "samples": len(problems) * n,
            "dropped": dropped,
            "unscored": unscored.get(name, 0),
            "no_answer": no_answer,
            "metrics": metrics,
            "maj_exact": {f"maj@{k}": maj_is_exact(n, k, cfg.eval.maj_exact_limit) for k in ks},
            "generate_wall_s": None if not wall or name not in wall else round(wall[name], 2),
            "per_problem": per_problem,
        }
    names = list(results["datasets"])
    keys = list(results["datasets"][names[0]]["metrics"]) if names else []
    results["mean"] = {
        m: sum(results["datasets"][d]["metrics"][m] for d in names) / len(names) for m in keys
    }
    return results


def markdown(results: dict, title: str) -> str:
    """The per-dataset table and the unweighted mean, in Markdown."""
    ks, n = results["k"], results["n"]
    cols = [f"avg@{n}", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks)]
    head = ["dataset", "problems", "dropped", "unscored", *cols]
    lines = [f"# {title}", "", f"{n} samples per problem; avg@k is the same for every k "
             "(unbiased: the mean over all n samples); pass@k unbiased; maj@k by verifier "
             "equivalence.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:"
                                                          for i in range(len(head))) + "|"]  # fmt: skip
    for name, d in results["datasets"].items():
        cells = [name, str(d["problems"]), str(d["dropped"]), str(d["unscored"])]
        cells += [f"{100 * d['metrics'][c]:.1f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    if results["datasets"]:
        cells = ["**mean**", "", "", ""] + [f"**{100 * results['mean'][c]:.1f}**" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Numbers are percentages."]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path, title: str) -> tuple[Path, Path]:
    js, md = out_dir / "results.json", out_dir / "results.md"
    js.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md.write_text(markdown(results, title), encoding="utf-8")
    return js, md


async def run_eval(
    cfg: EvalConfig,
    *,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
    engine=None,
) -> tuple[dict, Path]:
    """Generate what is missing, score everything, write the results; (results, out_dir)."""
    from agent_spo import builders

    out_dir = Path(cfg.run.output_dir) / cfg.run.name
    check_resume(cfg, out_dir)
    datasets = load_datasets(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(
        "# Resolved eval config written by agent-spo; rerun with: agent-spo eval <this file>\n"
        + dump_eval_config(cfg), encoding="utf-8",
    )  # fmt: skip
    t0 = time.perf_counter()
    with builders.build_verifier(cfg.verifier) as verifier:
        state = await generate(
            cfg, out_dir, datasets, verifier=verifier, log=log, progress=progress, engine=engine
        )
        gen_s = time.perf_counter() - t0
        wall = {k: v[1] - v[0] for k, v in state.per_dataset_s.items()}
        results = score(cfg, out_dir, datasets, verifier=verifier, log=log, wall=wall)
    results["generated"] = state.done - state.dropped
    results["dropped_now"] = state.dropped
    results["drop_causes"] = dict(state.drop_causes.most_common())
    results["generate_s"] = round(gen_s, 2)
    results["score_s"] = round(time.perf_counter() - t0 - gen_s, 2)
    results["model"] = cfg.model.path or "demo"
    results["sampling"] = {k: getattr(cfg.rollout, k) for k in
                           ("temperature", "top_p", "top_k", "max_response_tokens", "max_turns")}  # fmt: skip
    write_results(results, out_dir, f"eval: {cfg.run.name}")
    return results, out_dir
