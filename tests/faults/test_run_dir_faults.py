"""One owner per run directory, and --resume that has nothing to do: each is refused at
once with a clear message and a non-zero exit, and nothing of the run is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from faultkit import SMALL, kill, train_argv, wait_for
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, EXIT_FAILED, app
from agent_spo.rundir import RunLocked, lock_run_dir, read_holder


def _train(out, name, *extra):
    args = ["train", *SMALL, f"run.output_dir={out}", f"run.name={name}", *extra]
    return CliRunner().invoke(app, args)


def test_lock_excludes_a_second_owner_and_frees_on_exit(tmp_path):
    run = tmp_path / "r"
    with lock_run_dir(run):
        assert read_holder(run)["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"), lock_run_dir(run):
            pass
    with lock_run_dir(run):  # released on exit: the next owner gets it
        pass


def test_lock_is_freed_when_its_holder_is_killed(tmp_path):
    run = tmp_path / "r"
    code = (
        "import sys, time\nfrom agent_spo.rundir import lock_run_dir\n"
        f"with lock_run_dir({str(run)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"), lock_run_dir(run):
            pass
    finally:
        kill(holder)
    with lock_run_dir(run):  # SIGKILL left no stale lock
        pass


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    # an engine or worker process forked (not exec'd) while the lock is held shares the
    # locked file; it must not keep the run locked once the trainer is gone
    run = tmp_path / "r"
    code = (
        "import os, sys, time\nfrom agent_spo.rundir import lock_run_dir\n"
        f"with lock_run_dir({str(run)!r}):\n"
        "    child = os.fork()\n"
        # one write() per line: both processes share the pipe, and print() writes the text
        # and its newline separately, so two prints can interleave ("18336child")
        "    if child == 0:\n        os.write(1, b'child\\n')\n        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    os.write(1, f'{child}\\n'.encode())\n    time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = {parent.stdout.readline().strip() for _ in range(2)}  # both sides are past fork
    assert "" not in lines, parent.communicate()
    (child,) = (int(x) for x in lines if x != "child")
    try:
        parent.kill()  # the parent alone: its forked child lives on
        parent.wait(timeout=10)
        with lock_run_dir(run):
            pass
    finally:
        os.kill(child, 9)


def test_resume_of_a_run_still_starting_names_its_owner(tmp_path):
    run = tmp_path / "starting"
    with lock_run_dir(run):  # an owner that has not written config.yaml yet
        result = _train(tmp_path, "starting", "train.total_steps=1", "--resume")
    assert result.exit_code == EXIT_FAILED, result.output
    assert f"pid {os.getpid()}" in result.output


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_fails_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "live"
    first = subprocess.Popen(
        train_argv(tmp_path, "live", "train.total_steps=500"),
        start_new_session=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: (run / "config.yaml").exists(), 120, "the first run's config", first)
        assert read_holder(run)["pid"] == first.pid
        for extra in ([], ["--resume"]):  # the same command again, and a resume while it runs
            second = _train(tmp_path, "live", "train.total_steps=500", *extra)
            assert second.exit_code == EXIT_FAILED, second.output
            assert f"pid {first.pid}" in second.output and "in use" in second.output
        assert first.poll() is None  # the owner is untouched and still training
    finally:
        kill(first)


@pytest.mark.slow
def test_resume_with_nothing_to_do_is_refused_and_changes_nothing(tmp_path):
    missing = _train(tmp_path, "never", "train.total_steps=1", "--resume")
    assert missing.exit_code == EXIT_CONFIG and "no run at" in missing.output
    assert not (tmp_path / "never").exists()  # a typo'd name does not start a new run

    done = _train(tmp_path, "done", "train.total_steps=2")
    assert done.exit_code == 0, done.output
    run = tmp_path / "done"
    before = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "summary.json")}

    again = _train(tmp_path, "done", "train.total_steps=2", "--resume")
    assert again.exit_code == EXIT_CONFIG and "is finished" in again.output, again.output
    earlier = _train(tmp_path, "done", "train.total_steps=1", "--resume")
    assert earlier.exit_code == EXIT_CONFIG and "past train.total_steps=1" in earlier.output
    assert {f: (run / f).read_bytes() for f in before} == before  # no row, no summary change

    more = _train(tmp_path, "done", "train.total_steps=3", "--resume")  # what is allowed
    assert more.exit_code == 0, more.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
