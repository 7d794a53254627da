"""The GPU device check runs end to end here on a CPU-sized model (`--tiny`): every part
reports, none errors, and the shell entry point works as a lent machine would run it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_spo.bench.device import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "report.json"
    main(["--tiny", "--out", str(out)])
    return json.loads(out.read_text())


def test_every_part_reports_without_error(report):
    for part in ("learner", "chunked_vs_full", "logprob_agreement", "engine", "lora",
                 "fsdp_learner"):  # fmt: skip
        assert "error" not in report[part], report[part]
    assert report["shape"] == "tiny" and report["device"] == "cpu"


def test_learner_numbers_are_measured(report):
    learner = report["learner"]
    assert learner["trainable_tokens"] == 2 * (256 - 256 // 8)  # two sequences' responses
    assert learner["tokens_per_s"] > 0 and len(learner["step_s_all"]) == 3
    assert math.isfinite(learner["loss"]) and learner["drift"] >= 0
    assert learner["lean_logprobs"] and learner["gradient_checkpointing"]
    assert 0 < learner["logprob_pass_s"] < learner["step_s_median"]
    assert learner["peak_memory_gb"] is None and learner["update_mfu"] is None  # no GPU here


def test_the_fsdp2_step_runs_the_sharded_path_on_one_rank(report):
    sharded, plain = report["fsdp_learner"], report["learner"]
    assert sharded["fsdp"] and not plain["fsdp"]
    assert sharded["trainable_tokens"] == plain["trainable_tokens"]
    assert sharded["tokens_per_s"] > 0 and math.isfinite(sharded["loss"])


def test_chunked_and_full_log_probs_agree_under_bf16(report):
    part = report["chunked_vs_full"]
    assert part["chunked_lean"] and not part["full_lean"]
    assert part["logprob_max_abs"] < 0.1 and part["grad_rel_diff"] < 0.05


def test_bf16_log_probs_are_close_to_float32(report):
    agree = report["logprob_agreement"]
    assert agree["tokens"] == 256 - 256 // 8
    assert 0 < agree["mean_abs"] < 0.1 and agree["max_abs"] < 1.0


def test_engine_generates_and_takes_the_learners_weights(report):
    engine = report["engine"]
    assert 0 < engine["generated_tokens"] <= 4 * 8  # 4 requests of at most 8 new tokens
    assert engine["tokens_per_s"] > 0 and engine["weight_push_s"] >= 0
    slept = engine["colocated"]  # on CPU there is no device memory to report
    assert slept["generates_after_wake"] and slept["allocated_gb_asleep"] is None
    assert engine["stats"]["sleeps"] == 1


@pytest.mark.slow
def test_the_shell_script_writes_the_report_under_out(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "scripts" / "device_check.sh"), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "device.json").read_text())
    assert set(report) >= {"learner", "logprob_agreement", "engine"}
    assert '"learner"' in done.stdout  # one line per part as it finishes


def test_the_lora_step_trains_the_adapter_and_the_engine_takes_it_alone(report):
    part, plain = report["lora"], report["learner"]
    assert part["rank"] == 32 and part["trainable_tokens"] == plain["trainable_tokens"]
    assert 0 < part["trainable_params"] < plain["trainable_params"] == plain["params"]
    assert part["tokens_per_s"] > 0 and math.isfinite(part["loss"])
    assert 0 < part["adapter_sync_mib"] < part["full_sync_mib_bf16"]
    assert part["engine_version"] == 6  # warm-up, 3 timed steps, 2 more: the version sent
    # bf16 matmuls on both sides, different batch shapes: close, not bit-equal
    assert part["engine_vs_learner_logprob_max_diff"] < 0.05
