"""`cluster.backend: ray` for real: `agent-spo train configs/cluster_demo.yaml` starts a Ray
cluster on 127.0.0.1's machine with logical GPUs, places 2 learner ranks, 2 engine replicas
and 2 sandbox servers, and trains. Midway one sandbox server and one engine replica are
killed; the run goes on with the others and finishes. Afterwards no process of the run is
left (checked in the process table)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_spo.engines.replicas import free_port

pytest.importorskip("ray", reason="Ray is the cluster extra: pip install 'agent-spo[cluster]'")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "learner.batch_size=4", "rollout.workers=4", "sandbox.pool_size=1",
    "rollout.max_response_tokens=128", "data.synthetic_tasks=40", "learner.lr=1e-4",
    "train.checkpoint_every=2", "train.eval_every=0", "algo.init.mode=none",
    "train.max_drop_share=1", "verifier.workers=1",
]  # fmt: skip
STEPS = 6
KILL_AFTER = 2  # steps


def _processes() -> dict[int, str]:
    """Every process's pid and command line."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(d.name)] = cmd
    return out


def _ours(cmd: str) -> bool:
    return any(w in cmd for w in ("agent_spo", "ray::", "raylet", "gcs_server", "ray/_private"))


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """One training run of configs/cluster_demo.yaml; kills one sandbox server and one
    replica after step KILL_AFTER. Returns the run directory, exit code, output and the
    processes that were left."""
    out_dir = tmp_path_factory.mktemp("cluster")
    run = out_dir / "c"
    before = set(_processes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_spo.cli", "train", "configs/cluster_demo.yaml", *SMALL,
         f"train.total_steps={STEPS}", f"run.output_dir={out_dir}", "run.name=c"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    killed: dict[str, dict] = {}
    deadline = time.monotonic() + 900
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if not killed and len(_rows(run / "metrics.jsonl")) >= KILL_AFTER:
                table = json.loads((run / "cluster" / "processes.json").read_text())
                for role in ("sandbox", "engine"):
                    victim = next(p for p in table if p["role"] == role and p["index"] == 1)
                    os.killpg(victim["pid"], signal.SIGKILL)  # the server and its children
                    killed[role] = victim
            time.sleep(0.2)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(2)  # processes that were told to stop have had time to
    left = {pid: cmd for pid, cmd in _processes().items() if pid not in before and _ours(cmd)}
    return run, proc.returncode, output, killed, left


def test_the_cluster_demo_places_every_process_trains_through_kills_and_leaves_nothing(
    cluster_run,
):
    run, code, output, killed, left = cluster_run
    assert code == 0, output[-4000:]
    assert not left, f"processes of the run still running: {left}"
    assert set(killed) == {"sandbox", "engine"}, "the run ended before the kill"
    text = " ".join(output.split())
    assert "placing 2 learner rank(s), 2 engine replica(s), 2 sandbox server(s)" in text
    assert "learner ranks 0-1; engine replicas 0-1; sandbox servers 0-1" in text
    assert "engines 1/2  sandboxes 1/2" in output, output[-1500:]  # the live status line

    table = json.loads((run / "cluster" / "processes.json").read_text())
    assert sorted((p["role"], p["index"]) for p in table) == [
        ("engine", 0),
        ("engine", 1),
        ("learner", 1),
        ("sandbox", 0),
        ("sandbox", 1),
    ]  # learner rank 0 is the trainer itself
    assert all(p["device"] == "cpu" for p in table)  # logical GPUs: every process on the CPU
    assert {len(p["gpus"]) for p in table if p["role"] != "sandbox"} == {1}

    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = rows[0], rows[-1]
    # before the kills: both replicas in rotation and synced, both sandbox servers live
    assert first["rollout/replicas_live"] == 2 and first["sandbox/servers_live"] == 2
    assert first["rollout/replica0_version"] == first["rollout/replica1_version"] == 1
    # both replicas generated and both servers ran calls before the kill
    at_kill = rows[KILL_AFTER - 1]
    assert at_kill["rollout/replica0_requests"] > 0 and at_kill["rollout/replica1_requests"] > 0
    # (beyond the one smoke call the trainer makes before training, on server 0)
    assert at_kill["sandbox/server0_served"] > 1 and at_kill["sandbox/server1_served"] > 0
    # after them: the survivors carry the run; the lost work is counted, never scored
    assert last["rollout/replicas_live"] == 1 and last["sandbox/servers_live"] == 1
    assert last["rollout/replica0_version"] == STEPS
    assert last["rollout/replica0_requests"] > at_kill["rollout/replica0_requests"]
    assert last["sandbox/server1_live"] == 0 and last["sandbox/server0_live"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    # both learner ranks stepped and saved: the last checkpoint holds each rank's shard
    state = sorted(run.glob("checkpoints/ckpt-*"))[-1] / "state"
    assert sorted(p.name for p in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def _train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent_spo.cli", "train", "configs/cluster_demo.yaml", *SMALL,
         "train.total_steps=1", f"run.output_dir={tmp_path}", "run.name=c", *overrides],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_a_layout_the_cluster_cannot_hold_and_a_server_that_cannot_start_stop_the_run(tmp_path):
    """Both fail with exit 1 and the reason, train nothing, and leave no process behind."""
    from agent_spo.cli import EXIT_FAILED

    before = set(_processes())
    too_big = _train(tmp_path / "a", "cluster.engine_replicas=5")  # 4 logical GPUs
    text = " ".join(too_big.stderr.split())
    assert too_big.returncode == EXIT_FAILED, text[-3000:]
    assert ("cluster: the processes do not fit a Ray cluster started for this run: engine "
            "replica 2 (1 CPUs, 1 GPUs) does not fit") in text  # fmt: skip

    broken = _train(tmp_path / "b", "cluster.engine_args=[--dtype, float7]")
    text = " ".join(broken.stderr.split())
    assert broken.returncode == EXIT_FAILED, text[-3000:]
    assert "cluster: engine replica 0 exited with code" in text and "float7" in text
    assert "engine0.log" in text
    for run in (tmp_path / "a" / "c", tmp_path / "b" / "c"):
        assert not (run / "metrics.jsonl").exists()
    time.sleep(2)
    left = {pid: cmd for pid, cmd in _processes().items() if pid not in before and _ours(cmd)}
    assert not left, f"processes of the runs still running: {left}"


def test_sigterm_mid_run_stops_every_process_of_the_cluster(tmp_path):
    """A scheduler cancelling the job (SIGTERM) unwinds like Ctrl-C: the trainer stops the
    servers, the rank, the actors and the Ray cluster it started, and exits 130."""
    before = set(_processes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_spo.cli", "train", "configs/cluster_demo.yaml", *SMALL,
         "train.total_steps=50", f"run.output_dir={tmp_path}", "run.name=c"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while len(_rows(tmp_path / "c" / "metrics.jsonl")) < 1 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    assert len(_rows(tmp_path / "c" / "metrics.jsonl")) < 50
    time.sleep(2)
    left = {pid: cmd for pid, cmd in _processes().items() if pid not in before and _ours(cmd)}
    assert not left, f"processes of the run still running: {left}"


def test_a_run_joins_a_running_ray_cluster_and_leaves_it_running(tmp_path):
    """`cluster.address`: the run places its processes on a cluster started with `ray start
    --head`, stops them at the end, and leaves the cluster itself up."""
    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = subprocess.run(
        [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=8", "--num-gpus=4",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        # by address: Ray's token authentication needs RAY_AUTH_MODE=token for that; the
        # run says so instead of a traceback
        refused = _train(tmp_path / "a", f"cluster.address=127.0.0.1:{port}")
        text = " ".join(refused.stderr.split())
        assert refused.returncode == 1, text[-3000:]
        assert f"cluster.address: could not join the Ray cluster at 127.0.0.1:{port}" in text
        assert "needs RAY_AUTH_MODE=token" in text
        ran = _train(tmp_path, "cluster.address=auto", "train.total_steps=2")
        text = " ".join(ran.stderr.split())
        assert ran.returncode == 0, text[-3000:]
        assert "cluster: the Ray cluster at auto, 1 node(s)" in text
        assert len(_rows(tmp_path / "c" / "metrics.jsonl")) == 2
        time.sleep(2)
        running = [c for c in _processes().values() if "agent_spo" in c and " serve " in c]
        assert not running, f"the run's servers are still running: {running}"
        status = subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{port}"],
                                env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert status.returncode == 0 and "4.0 GPU" in status.stdout, status.stdout
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
