"""`agent-spo replay` on a real episode log: list, filters, detail, tokens, re-run, HTML.

The log is made by `eval` with a scripted engine (tests/fakes.py) and the real runner,
sandbox and verifier: a correct episode with a tool call, one whose code raises, and one
whose tool output is capped for the model and that ends without an answer. A
training-style copy adds the `train` object the trainer writes. The HTML page is opened
in a real headless Chromium.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fakes import ScriptedEngine
from typer.testing import CliRunner

from agent_spo.cli import app
from agent_spo.demo.demonstrations import call_text
from agent_spo.evaluate.config import EvalConfig
from agent_spo.evaluate.run import run_eval

runner = CliRunner()
WIDE = {"COLUMNS": "200"}

SCRIPTS = {  # problem text -> the model's turns
    "What is two plus three?": [call_text("hermes", "print(2 + 3)"), "So \\boxed{5}."],
    "What is one over zero?": [call_text("hermes", "1 / 0"), "Then \\boxed{7}."],
    "Print many x.": [call_text("hermes", "print('x' * 1000)"), "I do not know."],
}
PROBLEMS = [("add", "What is two plus three?", "5"), ("div", "What is one over zero?", "8"),
            ("long", "Print many x.", "3")]  # fmt: skip


def turn_engine(tokenizer) -> ScriptedEngine:
    """Plays each problem's script; the turn is the number of tool results seen so far."""

    def reply(prompt_ids):
        text = tokenizer.decode(prompt_ids)
        script = next(v for k, v in SCRIPTS.items() if k in text)
        return script[text.count("<tool_response>")] + "<|im_end|>"

    return ScriptedEngine(
        reply=reply, tokenizer=tokenizer, version=2, max_model_len=2048, logprob=-0.2
    )


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """(eval output dir, training-style run dir) holding the same three episodes."""
    from transformers import AutoTokenizer

    from agent_spo.demo.build import ensure_demo_model

    tmp = tmp_path_factory.mktemp("replay")
    data = tmp / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": i, "problem": p, "answer": a}) + "\n"
                            for i, p, a in PROBLEMS))  # fmt: skip
    cfg = EvalConfig.model_validate({
        "run": {"name": "ev", "output_dir": str(tmp)},
        "rollout": {"workers": 3, "max_turns": 3},
        "sandbox": {"pool_size": 1}, "verifier": {"workers": 1},
        "eval": {"datasets": [{"path": str(data)}], "n": 1},
    })  # fmt: skip
    tok = AutoTokenizer.from_pretrained(ensure_demo_model(log=lambda m: None))
    _, out = asyncio.run(run_eval(cfg, engine=turn_engine(tok), log=lambda m: None))
    rows = sorted((json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()),
                  key=lambda r: r["prompt_id"])  # add, div, long  # fmt: skip
    (out / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp / "run"
    run.mkdir()
    shutil.copy(out / "config.yaml", run / "config.yaml")
    with (run / "episodes.jsonl").open("w") as f:
        for i, r in enumerate(rows):
            r = {k: v for k, v in r.items() if k != "eval"}
            r["train"] = {"step": 1 + i // 2, "v_hat": 0.25, "lag": 1}
            f.write(json.dumps(r) + "\n")
    return out, run


def _replay(*args: str):
    result = runner.invoke(app, ["replay", *map(str, args)], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.stdout


def _indices(listing: str) -> list[int]:
    return [int(m) for m in re.findall(r"^│ +(\d+) │", listing, re.M)]


def test_list_and_filters(logs):
    out, run = logs
    assert _indices(_replay(out)) == [0, 1, 2]
    assert _indices(_replay(out, "--failed")) == [1, 2]
    assert _indices(_replay(out, "--tool-error")) == [1]
    assert _indices(_replay(out, "--verdict", "correct")) == [0]
    assert _indices(_replay(out, "--prompt", "long")) == [2]
    assert _indices(_replay(run, "--step", "2")) == [2]
    listing = _replay(out / "episodes.jsonl", "--limit", "2")
    assert _indices(listing) == [0, 1] and "3 episodes match" in listing
    assert "toy / 0" in listing  # dataset / sample column for eval logs


def test_detail_shows_turns_calls_results_and_verdict(logs):
    out, _ = logs
    text = _replay(out, "1")
    for expected in ("What is one over zero?", "1 / 0", "status error", "fault tool",
                     "ZeroDivisionError", "the model saw", "latency", "incorrect",
                     "different integers: 7 vs 8", "turn 2", "policy v2",
                     "not a training episode"):  # fmt: skip
        assert expected in text, expected
    capped = _replay(out, "2")
    assert "output cut for the model" in capped and "no_answer" in capped


def test_training_rows_show_tracker_advantage_and_lag(logs):
    _, run = logs
    text = _replay(run, "0")
    assert "step 1  v̂ before 0.250" in text
    assert "advantage raw 0.750" in text and "policy lag 1" in text  # r - v̂ = 1 - 0.25
    assert "v̂ after is not in this log" in text


def test_tracker_values_as_the_trainer_logs_them(logs, tmp_path):
    """The trainer's `train` object: v_hat, v_after, adv, group, lag."""
    _, run = logs
    rows = [json.loads(x) for x in (run / "episodes.jsonl").read_text().splitlines()]
    rows[0]["train"].update({"v_after": 0.3125, "adv": 1.25, "group": None})
    rows[1]["train"].update({"v_hat": None, "v_after": None, "adv": -0.5, "group": 4})
    spo = tmp_path / "spo"
    spo.mkdir()
    shutil.copy(run / "config.yaml", spo / "config.yaml")
    (spo / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = _replay(spo, "0")
    assert "v̂ before 0.250  v̂ after 0.312  advantage 1.250  policy lag 1" in text
    assert "not in this log" not in text
    grpo = _replay(spo, "1")
    assert "advantage -0.500" in grpo and "GRPO episode" in grpo and "group 4" in grpo


def test_tokens_view_marks_trainable_tokens(logs):
    out, _ = logs
    text = _replay(out, "0", "--tokens")
    m = re.search(r"(\d+) of (\d+) tokens trainable", text)
    assert m and 0 < int(m.group(1)) < int(m.group(2))


def test_rerun_reproduces_the_episode_and_reports_tampering(logs, tmp_path):
    out, _ = logs
    text = _replay(out, "1", "--rerun")
    assert "no differences from the log" in text
    # a log whose recorded tool output and verdict disagree with a fresh run
    rows = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    rows[0]["tool_calls"][0]["observation"] = "6"
    rows[0]["verdict"], rows[0]["reward"] = "incorrect", 0.0
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(out / "config.yaml", bad / "config.yaml")
    (bad / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = _replay(bad, "0", "--rerun")
    assert "3 difference(s) from the log" in text
    assert "tool call 1 (python): output differs" in text
    assert "verdict: 'incorrect' -> 'correct'" in text


def test_a_torn_log_still_lists_with_a_warning(logs, tmp_path):
    out, _ = logs
    torn = tmp_path / "torn.jsonl"
    text = (out / "episodes.jsonl").read_text()
    torn.write_text(text + text.splitlines()[0][:50])
    result = runner.invoke(app, ["replay", str(torn)], env=WIDE)
    assert result.exit_code == 0 and _indices(result.stdout) == [0, 1, 2]
    assert "torn" in result.stderr


def test_bad_input_exits_2_and_says_why(logs, tmp_path):
    out, _ = logs
    for args, message in (
        ([tmp_path], "holds no episode log"),
        ([tmp_path / "none.jsonl"], "not found"),
        ([out, "9"], "no episode 9"),
        ([out, "ep-x"], "EPISODE is the number"),
        ([out, "--rerun"], "need an EPISODE"),
    ):
        result = runner.invoke(app, ["replay", *map(str, args)], env=WIDE)
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)


# ----------------------------------------------------------------------------- HTML


def _chromium() -> str:
    """The Chromium binary; installed with apt when missing (skip only if that fails)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    why = "chromium is not installed"
    if shutil.which("apt-get") and os.geteuid() == 0:
        r = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True,
                           text=True, timeout=900)  # fmt: skip
        if r.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium")
        why += f" and `apt-get install -y chromium` failed: {r.stderr.strip()[-300:]}"
    else:
        why += " and cannot be installed here (needs apt-get as root)"
    pytest.skip(why)


def _browse(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run([_chromium(), *flags, *extra, url], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_html_page_renders_in_headless_chromium(logs, tmp_path):
    out, run = logs
    page = tmp_path / "page.html"
    _replay(run, "--html", page)
    source = page.read_text()
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", source)
    assert "<link" not in source and "@import" not in source and "url(" not in source
    assert '<tr data-index="' not in source  # rows come from the script, not the markup

    dom = _browse(page.as_uri(), tmp_path / "p1", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-rendered="yes"' in dom.stdout
    assert len(re.findall(r'<tr data-index="\d+"', dom.stdout)) == 3
    assert "3 of 3 listed episodes shown" in dom.stdout

    detail = _browse(page.as_uri() + "#ep-1", tmp_path / "p2", "--dump-dom").stdout
    assert "episode #1" in detail and "ZeroDivisionError" in detail and "1 / 0" in detail
    assert "v̂ before 0.250" in detail and "policy lag 1" in detail
    assert 'class="t-model' in detail and 'class="t-tool' in detail  # the tokens view

    shot = tmp_path / "shot.png"
    r = _browse(page.as_uri() + "#ep-0", tmp_path / "p3", "--window-size=1200,900",
                f"--screenshot={shot}")  # fmt: skip
    assert r.returncode == 0 and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_escapes_what_the_model_wrote(logs, tmp_path):
    """Model text that looks like markup stays text: no script of its own runs."""
    out, _ = logs
    rows = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    rows[0]["answer"] = '</script><img src=x onerror="document.title=1"><b id="pwned">'
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(out / "config.yaml", evil / "config.yaml")
    (evil / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = tmp_path / "evil.html"
    _replay(evil, "--html", page)
    assert "</script><img" not in page.read_text()
    dom = _browse(page.as_uri(), tmp_path / "p4", "--dump-dom").stdout
    assert '<b id="pwned">' not in dom and "<img" not in dom  # no element was made
    assert "&lt;/script&gt;&lt;img src=x" in dom  # the text is shown as text


def test_a_turn_split_by_a_weight_update_shows_as_one_turn_with_both_versions(logs, tmp_path):
    """Split the first model turn of an episode in two segments (versions 2 and 3), as
    an update mid-turn leaves it: replay shows one turn, "policy v2→3", and a re-run reads
    the final answer from the whole last turn."""
    out, _ = logs
    row = json.loads((out / "episodes.jsonl").read_text().splitlines()[0])
    segs = row["segments"]
    last = max(i for i, s in enumerate(segs) if s["kind"] == "model")
    s = segs[last]
    half = len(s["token_ids"]) // 2
    segs[last:last + 1] = [
        {**s, "token_ids": s["token_ids"][:half], "logprobs": s["logprobs"][:half]},
        {**s, "token_ids": s["token_ids"][half:], "logprobs": s["logprobs"][half:],
         "policy_version": s["policy_version"] + 1},
    ]  # fmt: skip
    split = tmp_path / "split.jsonl"
    split.write_text(json.dumps(row) + "\n")
    shutil.copy(out / "config.yaml", tmp_path / "config.yaml")
    text = _replay(split, "0")
    version = s["policy_version"]
    assert f"policy v{version}→{version + 1}" in text
    assert "turn 3" not in text and "turn 2" in text  # two turns, as before the split
    split_dir = tmp_path / "run"
    split_dir.mkdir()
    shutil.copy(out / "config.yaml", split_dir / "config.yaml")
    shutil.copy(split, split_dir / "episodes.jsonl")
    assert "no differences from the log" in _replay(split_dir, "0", "--rerun")
