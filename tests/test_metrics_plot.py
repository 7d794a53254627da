"""The metric registry, the metrics log (JSON lines and TensorBoard) and the run plot."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, app
from agent_spo.metrics import MetricsLog, UndefinedMetric, is_defined, read_metrics
from agent_spo.plot import plot_run


def test_every_metric_is_defined_once_and_namespaced():
    assert is_defined("loss/clip_frac") and is_defined("rollout/dropped/sandbox")
    assert not is_defined("rollout/dropped/a/b") and not is_defined("clip_frac")
    assert not is_defined("loss/clip_fraction")


def test_metrics_log_refuses_an_undefined_key_and_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "reward/mean": 0.5})
    with pytest.raises(UndefinedMetric, match="reward/avg"):
        log.write({"step": 2, "reward/avg": 0.5})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/mean": 0.5}]


def test_sandbox_metrics_count_only_what_ran_in_the_sandbox():
    from agent_spo.episode.trajectory import Segment, ToolCallRecord, Trajectory
    from agent_spo.pipeline import sandbox_metrics

    def traj(*calls):
        return Trajectory("p", (1, 2), (Segment("model", (3,), (-0.1,), 0),), tool_calls=calls)

    def call(status, latency, fault=None):
        return ToolCallRecord("python", {"code": "1"}, "obs", fault, status, latency)

    malformed = ToolCallRecord("python", None, "bad call", "model", None, 0.0)
    batch = [
        traj(call("ok", 0.1), call("timeout", 2.0, "model")),
        traj(malformed),
        traj(call("ok", 0.3), call("error", 0.2, "model"), call("ok", 0.2)),
        traj(),
    ]
    m = sandbox_metrics(batch)
    assert all(is_defined(k) for k in m)
    assert m["sandbox/runs_per_episode"] == 5 / 4  # the malformed call never ran
    assert m["sandbox/failed_frac"] == 2 / 5
    assert m["sandbox/status/timeout"] == 1 and m["sandbox/status/error"] == 1
    assert "sandbox/status/ok" not in m
    assert m["sandbox/latency_mean_s"] == pytest.approx(2.8 / 5)
    assert 0.3 < m["sandbox/latency_p95_s"] <= 2.0
    none_ran = sandbox_metrics([traj(malformed)])
    assert none_ran == {"sandbox/runs_per_episode": 0.0, "sandbox/failed_frac": 0.0}


def test_tensorboard_events_hold_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        log.write({"step": step, "reward/mean": step / 10, "loss/pg": -step})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, round(e.value, 6)) for e in acc.Scalars("reward/mean")]
    assert got == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [e.value for e in acc.Scalars("loss/pg")] == [-1, -2, -3]


def _wandb_records(path):
    """The records of a W&B run file (.wandb: a LevelDB-style log of protobuf records),
    read here so the test checks what W&B would upload, not W&B's own reader."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_weights_and_biases_offline_gets_every_row_and_a_resume_is_its_own_run_in_the_group(
    tmp_path, monkeypatch
):
    pytest.importorskip("wandb", reason="W&B is the wandb extra (installed by make test)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = {"project": "agent-spo-test", "name": "demo", "config": {"algo": {"name": "spo"}}}
    log = MetricsLog(tmp_path, wandb=spec)
    for step in (1, 2, 3):
        log.write({"step": step, "reward/mean": step / 10, "loss/pg": -step})
    log.close()
    # --resume from the step-2 checkpoint: step 3 again, with other values; W&B would drop
    # a step it has seen from the run it continued, so the resume is a run of its own
    log = MetricsLog(tmp_path, wandb={**spec, "resumed_at": 2})
    log.write({"step": 3, "reward/mean": 0.35, "loss/pg": -3.5})
    log.close()

    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"), key=os.path.getmtime)
    assert len(files) == 2
    runs = []
    for f in files:
        history, meta = [], None
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in r.history.item}  # fmt: skip
                history.append((items.get("_step"), items.get("reward/mean"), items.get("loss/pg")))
            elif kind == "run":
                meta = (r.run.project, r.run.run_group, r.run.display_name)
        runs.append((meta, history))
    assert runs == [
        (("agent-spo-test", "demo", "demo"), [(1, 0.1, -1), (2, 0.2, -2), (3, 0.3, -3)]),
        (("agent-spo-test", "demo", "demo (resumed at step 2)"), [(3, 0.35, -3.5)]),
    ]


def test_an_optional_logger_that_is_not_installed_is_refused_before_any_work(monkeypatch):
    import importlib.util

    from agent_spo.config import load_config
    from agent_spo.train import UnsupportedConfig, check_inputs

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))  # fmt: skip
    cfg = load_config(None, ["train.wandb=true", "data.synthetic_tasks=40"])
    with pytest.raises(UnsupportedConfig, match=r"train.wandb needs the wandb package: pip "
                       r"install 'agent-spo\[wandb\]'"):  # fmt: skip
        check_inputs(cfg)


def _fake_run(path, steps=30, eval_every=10, grpo=False):
    path.mkdir()
    rows = []
    for s in range(steps + 1):
        row = {"step": s}
        if s:
            row.update({"reward/mean": s / steps, "tool/calls_per_episode": 1.0,
                        "loss/clip_frac": 0.01, "tracker/drift": 0.02,
                        "perf/learner_s": 2.0, "perf/wait_s": 0.5,
                        "sandbox/failed_frac": 0.1})  # fmt: skip
            if grpo:
                row["grpo/samples_degenerate_frac"] = 0.4
            else:
                row.update({"tracker/v_hat_mean": 0.4, "loss/adv_zero_frac": 0.0})
        if s % eval_every == 0:
            row.update({"eval/accuracy": 0.3 + s / 100, "eval/tool_use_rate": 0.9})
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"st')


def test_plot_draws_one_or_several_runs(tmp_path):
    _fake_run(tmp_path / "spo")
    _fake_run(tmp_path / "grpo", grpo=True)
    png = plot_run(tmp_path / "spo")
    assert png == tmp_path / "spo" / "curves.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    both = CliRunner().invoke(
        app,
        ["plot", str(tmp_path / "spo"), str(tmp_path / "grpo"), "--out", str(tmp_path / "c.png")],
    )
    assert both.exit_code == 0, both.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_of_a_directory_without_metrics_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == EXIT_CONFIG
    assert "metrics.jsonl" in result.output
