"""`agent-spo train` with learner ranks, as users start it: `learner.world_size=2` (the
trainer starts rank 1 itself) and torchrun; the sharded checkpoint resumes at world size 1;
a rank killed mid-run ends the run with exit 1 naming it (real processes throughout)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults.faultkit import SMALL, cli, free_port, wait_for

from agent_spo.cli.args import EXIT_FAILED

pytestmark = pytest.mark.slow  # whole training runs, 10-25 s each


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _rank_children(parent: int) -> list[int]:
    """Pids of the learner-rank processes ``parent`` started (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == parent and "agent_spo.dist.rank" in cmdline:
            found.append(int(entry.name))
    return found


def _shards(ckpt: Path) -> list[str]:
    return sorted(p.name for p in (ckpt / "state").glob("*.distcp"))


def test_two_ranks_train_and_the_checkpoint_resumes_in_one_process(tmp_path):
    run = tmp_path / "two"
    args = [*SMALL, f"run.output_dir={tmp_path}", "run.name=two", "train.checkpoint_every=2"]
    first = _run(cli("train", *args, "learner.world_size=2", "train.total_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = run / "checkpoints" / "ckpt-000002"
    assert _shards(ckpt) == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its shard
    assert not list((ckpt / "model").glob("*.safetensors"))  # sharded: no full copy
    second = _run(cli("train", *args, "learner.world_size=1", "train.total_steps=3", "--resume"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from ckpt-000002" in second.stderr + second.stdout
    assert _steps(run) == [1, 2, 3]
    assert list((run / "checkpoints" / "ckpt-000003" / "model").glob("*.safetensors"))


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed beside this interpreter")  # fmt: skip
def test_torchrun_starts_the_same_training(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    argv = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "agent_spo.cli",
            "train", *SMALL, f"run.output_dir={tmp_path}", "run.name=tr",
            "train.total_steps=2", "train.checkpoint_every=2"]  # fmt: skip
    done = _run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps(tmp_path / "tr") == [1, 2]
    assert _shards(tmp_path / "tr" / "checkpoints" / "ckpt-000002") == [
        "__0_0.distcp", "__1_0.distcp",
    ]  # fmt: skip


def test_a_rank_killed_mid_run_ends_the_run_naming_it(tmp_path):
    run = tmp_path / "killed"
    argv = cli("train", *SMALL, f"run.output_dir={tmp_path}", "run.name=killed",
               "learner.world_size=2", "train.total_steps=500")  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(_steps(run)) >= 1, 120, "a first learner step", proc)
        (rank1,) = _rank_children(proc.pid)
        os.kill(rank1, signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_FAILED, out[-3000:]
    assert time.monotonic() - t0 < 60  # not the 600 s rank timeout
    assert f"rank 1 (pid {rank1}) exited with signal SIGKILL" in " ".join(out.split())
    assert len(_steps(run)) < 500


def test_the_ranks_a_killed_trainer_started_die_with_it(tmp_path):
    run = tmp_path / "orphans"
    argv = cli("train", *SMALL, f"run.output_dir={tmp_path}", "run.name=orphans",
               "learner.world_size=2", "train.total_steps=500")  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(_steps(run)) >= 1, 120, "a first learner step", proc)
        (rank1,) = _rank_children(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not Path(f"/proc/{rank1}").exists() or _zombie(rank1), 30,
                 f"rank 1 (pid {rank1}) to exit")  # fmt: skip
    finally:
        proc.kill()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
