"""`agent-spo eval`: configs, hand-computed metrics through the whole pipeline, resume.

A keyed engine (a ScriptedEngine from tests/fakes.py) answers each problem from a fixed
list (through the real runner, sandbox and verifier), so every metric of the run can be
checked against numbers worked out by hand. The demo model runs against every shared
benchmark in the slow test.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from fakes import ScriptedEngine

from agent_spo.config import ConfigError
from agent_spo.episode.log import EpisodeLog
from agent_spo.evaluate.command import model_dir_of
from agent_spo.evaluate.config import EvalConfig, load_eval_config
from agent_spo.evaluate.run import EvalMismatch, run_eval

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")
EVAL_CONFIGS = sorted((ROOT / "configs" / "eval").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    from agent_spo.demo.build import ensure_demo_model

    return AutoTokenizer.from_pretrained(ensure_demo_model(log=lambda m: None))


def keyed_engine(tokenizer, answers: dict[str, list[str]]) -> ScriptedEngine:
    """Answers each problem with the next text from its list (found in the prompt)."""
    left = {k: list(v) for k, v in answers.items()}

    def reply(prompt_ids):
        prompt = tokenizer.decode(prompt_ids)
        key = next(k for k in left if k in prompt)
        return left[key].pop(0) + "<|im_end|>"

    return ScriptedEngine(reply=reply, tokenizer=tokenizer, max_model_len=2048, logprob=-0.1)


def boxed(x: str) -> str:
    return f"The answer is \\boxed{{{x}}}."


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, datasets: list[tuple[str, Path]], **eval_kw) -> EvalConfig:
    return EvalConfig.model_validate({
        "run": {"name": "ev", "output_dir": str(tmp_path / "runs")},
        "rollout": {"workers": 4, "max_turns": 2, "max_response_tokens": 64},
        "sandbox": {"pool_size": 1},
        "verifier": {"workers": 1},
        "eval": {"datasets": [{"name": n, "path": str(p)} for n, p in datasets], **eval_kw},
    })  # fmt: skip


# ----------------------------------------------------------------------------- config


def test_eval_defaults_are_the_papers_sampling(tmp_path):
    cfg = _config(tmp_path, [("x", tmp_path / "x.jsonl")])
    r = cfg.rollout
    assert (r.temperature, r.top_p, r.top_k) == (0.6, 0.95, 20)
    assert cfg.eval.n == 32 and cfg.eval.ks == [1, 2, 4, 8, 16, 32]
    assert _config(tmp_path, [("x", tmp_path / "x.jsonl")], n=6).eval.ks == [1, 2, 4, 6]


@needs_data
@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.stem)
def test_every_eval_config_loads_and_finds_its_data(path):
    cfg = load_eval_config(path)
    assert cfg.eval.n == 32 and cfg.rollout.temperature == 0.6
    assert all(d.resolved().is_file() for d in cfg.eval.datasets)


def test_eval_configs_cover_the_paper_benchmarks_and_two_more():
    names = {p.stem for p in EVAL_CONFIGS}
    assert {"aime2024", "aime2025", "beyondaime", "brumo_2025", "hmmt_feb_2025",
            "math500", "gsm8k", "paper"} <= names  # fmt: skip
    paper = yaml.safe_load((ROOT / "configs" / "eval" / "paper.yaml").read_text())
    assert len(paper["eval"]["datasets"]) == 5


def test_bad_eval_configs_name_the_key(tmp_path):
    good = _write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "problem": "p", "answer": "1"}])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"eval": {"datasets": [{"path": str(good)}], "n": 4,
                                             "k": [1, 8], "oops": 1}}))  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_eval_config(path)
    assert "unknown key 'eval.oops'" in str(e.value)
    with pytest.raises(ConfigError, match="k values must lie in 1..n"):
        load_eval_config(_dump(tmp_path, {"eval": {"datasets": [{"path": str(good)}], "n": 4,
                                                   "k": [8]}}))  # fmt: skip
    with pytest.raises(ConfigError, match="file not found: .*missing.jsonl"):
        load_eval_config(_dump(tmp_path, {"eval": {"datasets": [{"path": "missing.jsonl"}]}}))
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load_eval_config(_dump(tmp_path, {"eval": {"datasets": [{"path": str(good)}]}}),
                         ["rollout.temperature=-1"])  # fmt: skip
    with pytest.raises(ConfigError, match="model.path is required"):
        load_eval_config(_dump(tmp_path, {"eval": {"datasets": [{"path": str(good)}]},
                                          "rollout": {"engine": "openai_http", "url": "http://x"}}))  # fmt: skip
    with pytest.raises(ConfigError, match="dataset names repeat: d"):
        load_eval_config(_dump(tmp_path, {"eval": {"datasets": [{"path": str(good)}] * 2}}))


def _dump(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_checkpoint_option_finds_the_model_directory(tmp_path):
    run = tmp_path / "run"
    model = run / "checkpoints" / "ckpt-000010" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model.parent / "state.json").write_text(json.dumps({"step": 10}))
    with pytest.raises(ValueError, match="holds sharded weights.*agent-spo export"):
        model_dir_of(run)  # learner ranks wrote it: config and tokenizer only
    (model / "model.safetensors").write_bytes(b"")  # one process: full weights too
    assert model_dir_of(run) == model  # a run directory: its latest checkpoint
    assert model_dir_of(run / "checkpoints") == model
    assert model_dir_of(model.parent) == model
    assert model_dir_of(model) == model
    with pytest.raises(ValueError, match="no model found"):
        model_dir_of(tmp_path / "nothing")


# ----------------------------------------------------------------------------- the run

# gold 1/2: three correct ways of writing it and one wrong answer.
#   c = 3: avg .75, pass@1 .75, pass@2 1 (C(1,2) = 0), pass@4 1
#   maj@1: 3 of 4 singles are correct -> .75; maj@2: 3 correct pairs score 1, 3 mixed pairs
#   tie -> .5 each: (3 + 1.5)/6 = .75; maj@4: the correct cluster has 3 votes -> 1
P1 = ("half", "What is one half?", "\\frac{1}{2}", ["0.5", "\\frac{1}{2}", "2/4", "3"])
# gold 7: one correct, "8" twice, one sample without an answer.
#   c = 1: avg .25, pass@1 .25, pass@2 1 - C(3,2)/C(4,2) = .5, pass@4 1
#   maj@1 .25; maj@2: {7,8} tie .5 twice, {7,-} 1, {8,8} 0, {8,-} 0 twice -> 2/6; maj@4: 8 wins -> 0
P2 = ("seven", "What is three plus four?", "7", ["7", "8", "8", None])
# gold 5: 6, 6.0 and 12/2 are one (wrong) cluster by the verifier, three strings by text.
#   c = 1: avg .25, pass@1 .25, pass@2 .5, pass@4 1
#   maj@1 .25; maj@2: three {6,6} pairs 0, three {6,5} ties .5 -> 1.5/6 = .25; maj@4: 0
P3 = ("five", "What is ten halved?", "5", ["6", "6.0", "12/2", "5"])
# a second dataset: one problem, always right -> every metric 1
P4 = ("nine", "What is three squared?", "9", ["9", "9", "9", "9"])

EXPECTED = {  # per dataset "toy": the mean over P1, P2, P3
    "avg@1": (0.75 + 0.25 + 0.25) / 3, "avg@4": (0.75 + 0.25 + 0.25) / 3,
    "pass@1": (0.75 + 0.25 + 0.25) / 3, "pass@2": (1 + 0.5 + 0.5) / 3, "pass@4": 1.0,
    "maj@1": (0.75 + 0.25 + 0.25) / 3, "maj@2": (0.75 + 2 / 6 + 0.25) / 3, "maj@4": 1 / 3,
}  # fmt: skip


def _answers(*problems) -> dict[str, list[str]]:
    return {text: [boxed(a) if a is not None else "I am not sure." for a in answers]
            for _, text, _, answers in problems}  # fmt: skip


def _datasets(tmp_path: Path):
    toy = _write_jsonl(tmp_path / "toy.jsonl", [
        {"id": pid, "problem": text, "answer": gold} for pid, text, gold, _ in (P1, P2, P3)
    ])  # fmt: skip
    easy = _write_jsonl(tmp_path / "easy.jsonl", [{"id": P4[0], "problem": P4[1], "answer": P4[2]}])
    return [("toy", toy), ("easy", easy)]


def test_metrics_through_the_real_runner_match_hand_computed_numbers(tmp_path, demo_tokenizer):
    cfg = _config(tmp_path, _datasets(tmp_path), n=4, k=[1, 2, 4])
    engine = keyed_engine(demo_tokenizer, _answers(P1, P2, P3, P4))
    results, out = asyncio.run(run_eval(cfg, engine=engine, log=lambda m: None))
    toy, easy = results["datasets"]["toy"], results["datasets"]["easy"]
    for key, value in EXPECTED.items():
        assert toy["metrics"][key] == pytest.approx(value), key
    assert all(v == 1.0 for v in easy["metrics"].values())
    for key in EXPECTED:  # the unweighted mean over the two datasets
        assert results["mean"][key] == pytest.approx((EXPECTED[key] + 1.0) / 2), key
    assert (toy["problems"], toy["samples"], toy["dropped"], toy["no_answer"]) == (3, 12, 0, 1)
    assert engine.calls == 16 and results["generated"] == 16
    per = {r["id"]: r for r in toy["per_problem"]}
    assert per["five"]["answers"] == 2  # 6 / 6.0 / 12/2 and 5
    # the files: JSON, Markdown, and a replayable episode log
    saved = json.loads((out / "results.json").read_text())
    assert saved["mean"] == pytest.approx(results["mean"])
    md = (out / "results.md").read_text()
    assert "| toy | 3 | 0 | 0 | 41.7 | 41.7 | 66.7 | 100.0 | 41.7 | 44.4 | 33.3 |" in md
    assert "| **mean** |" in md
    rows = list(EpisodeLog(out / "episodes.jsonl").summaries())
    assert len(rows) == 16 and {r.eval["dataset"] for r in rows} == {"toy", "easy"}
    assert (out / "config.yaml").is_file()


def test_an_interrupted_eval_resumes_without_regenerating(tmp_path, demo_tokenizer):
    cfg = _config(tmp_path, _datasets(tmp_path)[:1], n=4, k=[1, 4])
    engine = keyed_engine(demo_tokenizer, _answers(P1, P2, P3))
    first, out = asyncio.run(run_eval(cfg, engine=engine, log=lambda m: None))
    log = out / "episodes.jsonl"
    lines = log.read_text().splitlines()
    # "crash": keep 7 finished samples and half of the 8th line
    log.write_text("\n".join(lines[:7]) + "\n" + lines[7][: len(lines[7]) // 2])
    kept = {
        (json.loads(x)["eval"]["problem_id"], json.loads(x)["eval"]["sample"]) for x in lines[:7]
    }
    engine2 = keyed_engine(demo_tokenizer, _answers(P1, P2, P3))
    messages: list[str] = []
    second, _ = asyncio.run(run_eval(cfg, engine=engine2, log=messages.append))
    assert engine2.calls == 5 and second["generated"] == 5  # 12 - 7, the torn one included
    assert any("torn" in m for m in messages) and any("resuming: 7 samples" in m for m in messages)
    after = [json.loads(x)["eval"] for x in log.read_text().splitlines()]
    assert len(after) == 12 and len({(e["problem_id"], e["sample"]) for e in after}) == 12
    assert kept <= {(e["problem_id"], e["sample"]) for e in after}
    # a third run has nothing left to sample, and scores the same log the same way
    engine3 = keyed_engine(demo_tokenizer, {})
    third, _ = asyncio.run(run_eval(cfg, engine=engine3, log=lambda m: None))
    assert engine3.calls == 0 and third["generated"] == 0
    a, b = third["datasets"]["toy"], second["datasets"]["toy"]
    assert a["metrics"] == b["metrics"] and a["per_problem"] == b["per_problem"]
    assert a["generate_wall_s"] is None  # nothing was generated in the third run


def test_a_resume_with_other_sampling_settings_is_refused(tmp_path, demo_tokenizer):
    cfg = _config(tmp_path, _datasets(tmp_path)[1:], n=2)
    first = keyed_engine(demo_tokenizer, _answers(P4))
    asyncio.run(run_eval(cfg, engine=first, log=lambda m: None))
    hotter = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"temperature": 1.0})})
    with pytest.raises(EvalMismatch, match=r"rollout.temperature: 0.6 -> 1.0"):
        asyncio.run(run_eval(hotter, engine=keyed_engine(demo_tokenizer, {}), log=lambda m: None))
    more = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"n": 4, "k": None})})
    engine = keyed_engine(demo_tokenizer, _answers(P4))
    res, _ = asyncio.run(run_eval(more, engine=engine, log=lambda m: None))
    assert engine.calls == 2 and res["datasets"]["easy"]["samples"] == 4  # only the new two


# ----------------------------------------------------------------------------- demo model


@pytest.mark.slow
@needs_data
def test_demo_model_runs_on_every_shared_benchmark(tmp_path):
    """The real CLI, the demo model, two problems of each benchmark, two samples each."""
    from typer.testing import CliRunner

    from agent_spo.cli import app

    benches = [p.stem for p in EVAL_CONFIGS if p.stem != "paper"]
    datasets = []
    for b in benches:
        datasets += load_eval_config(ROOT / "configs" / "eval" / f"{b}.yaml").eval.model_dump()[
            "datasets"
        ]
    base = yaml.safe_load((ROOT / "configs" / "eval" / "paper.yaml").read_text())
    base["eval"]["datasets"] = datasets
    base["rollout"]["max_response_tokens"] = 256
    config = tmp_path / "all.yaml"
    config.write_text(yaml.safe_dump(base))
    out = tmp_path / "all"
    result = CliRunner().invoke(
        app, ["eval", str(config), "--samples", "2", "--problems", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert list(res["datasets"]) == benches
    for d in res["datasets"].values():
        assert d["problems"] == 2 and d["samples"] == 4
        assert all(0.0 <= v <= 1.0 for v in d["metrics"].values())
    assert "mean" in result.stdout and "pass@2" in result.stdout
    listing = CliRunner().invoke(app, ["replay", str(out), "--limit", "3"])
    assert listing.exit_code == 0, listing.output
    assert "dataset / sample" in listing.stdout


def test_a_checkpoint_is_evaluated_in_the_format_its_run_trained_with(tmp_path):
    """`eval --checkpoint RUN`: tool format, turns and thinking come from the run's
    config.yaml, unless the command line sets them."""
    import yaml

    from agent_spo.evaluate.command import build_config

    run = tmp_path / "run"
    (run / "checkpoints" / "ckpt-000003" / "model").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-000003" / "model" / "config.json").write_text("{}")
    (run / "checkpoints" / "ckpt-000003" / "model" / "model.safetensors").write_text("")
    (run / "checkpoints" / "ckpt-000003" / "state.json").write_text('{"step": 3}')
    (run / "checkpoints" / "latest").write_text("ckpt-000003\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"rollout": {
        "tool_format": "retool", "max_turns": 9, "enable_thinking": True,
        "system_prompt": "Think.\nThen answer.", "temperature": 1.0}}))  # fmt: skip
    for where in (run, run / "checkpoints", run / "checkpoints" / "ckpt-000003"):
        cfg = build_config("configs/eval/gsm8k.yaml", ["rollout.max_turns=4"], checkpoint=where,
                           samples=None, problems=None, out=None)  # fmt: skip
        r = cfg.rollout
        assert (r.tool_format, r.enable_thinking, r.system_prompt) == (
            "retool", True, "Think.\nThen answer.")  # fmt: skip
        assert r.max_turns == 4  # the command line wins
        assert r.temperature == 0.6  # sampling stays the eval config's
    bare = build_config("configs/eval/gsm8k.yaml", [], checkpoint=run / "checkpoints" /
                        "ckpt-000003" / "model", samples=None, problems=None, out=None)  # fmt: skip
    assert bare.rollout.tool_format == "hermes"  # a bare model directory: the config's own
