"""A trainer whose sandbox is broken: refused at start (no server, wrong or missing token),
stopped with the cause when the server dies mid-run, and never trained on a policy that
merely learned to avoid the tool."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from faultkit import SMALL, free_port, kill, train_argv, wait_for
from typer.testing import CliRunner

from agent_spo.cli import EXIT_FAILED, EXIT_SANDBOX, app
from agent_spo.episode.runner import EpisodeDropped
from agent_spo.pipeline import AllEpisodesDropped, _DropWatch

pytestmark = pytest.mark.slow


def _train(tmp_path, url, *extra, env=None):
    args = ["train", *SMALL, f"run.output_dir={tmp_path}", "run.name=r", "train.total_steps=1",
            "sandbox.backend=remote", f"sandbox.url={url}", *extra]  # fmt: skip
    return CliRunner(env=env).invoke(app, args)


def _nothing_trained(run) -> bool:
    return not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_no_server_refuses_the_run(tmp_path):
    result = _train(tmp_path, f"http://127.0.0.1:{free_port()}",
                    env={"AGENT_SPO_SANDBOX_TOKEN": ""})  # fmt: skip
    assert result.exit_code == EXIT_SANDBOX, result.output
    assert "health check" in result.output and "nothing was trained" in result.output
    assert _nothing_trained(tmp_path / "r")


def test_wrong_or_missing_token_refuses_the_run_and_the_right_one_trains(tmp_path, served_sandbox):
    server = served_sandbox(token="s3cret")
    for token in ("", "wrong"):
        result = _train(tmp_path, server.url, env={"AGENT_SPO_SANDBOX_TOKEN": token})
        assert result.exit_code == EXIT_SANDBOX, result.output
        assert "401" in result.output and "token" in result.output
        assert _nothing_trained(tmp_path / "r")
    # the token comes from the variable sandbox.token_env names, never from config.yaml
    result = _train(tmp_path, server.url, "sandbox.token_env=MY_TOKEN",
                    env={"MY_TOKEN": "s3cret"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "s3cret" not in (tmp_path / "r" / "config.yaml").read_text()


def test_server_killed_mid_run_stops_training_with_the_cause(tmp_path, served_sandbox):
    server = served_sandbox()
    run = tmp_path / "k"
    env = {**os.environ, "AGENT_SPO_SANDBOX_TOKEN": ""}
    trainer = subprocess.Popen(
        train_argv(tmp_path, "k", "train.total_steps=500", "sandbox.backend=remote",
                   f"sandbox.url={server.url}", "train.drop_window=16"),
        env=env, start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").exists(), 180, "a checkpoint", trainer)
        server.kill()
        t_kill = time.monotonic()
        out, _ = trainer.communicate(timeout=180)
        stopped_s = time.monotonic() - t_kill
    finally:
        kill(trainer)
    assert trainer.returncode == EXIT_FAILED, out
    assert "train.max_drop_share" in out and "sandbox" in out and "--resume" in out
    assert stopped_s < 120
    assert (run / "checkpoints" / "latest").exists()  # what was done is kept


def _dropped() -> EpisodeDropped:
    return EpisodeDropped("sandbox", "session_lost: ReadError")


def test_drop_share_stops_even_when_kept_episodes_reset_the_run_of_drops():
    # a broken tool: every episode that calls it drops, the others train; the "N in a
    # row" rule never fires, the share rule does once the window is full
    watch = _DropWatch(limit=200, max_share=0.2, window=20)
    with pytest.raises(AllEpisodesDropped, match=r"10 of the last 20 episodes.*session_lost"):
        for _ in range(100):
            watch.dropped(_dropped())
            watch.ok()


def test_drop_share_counts_only_infrastructure_drops():
    # prompts too long for the context are the data's doing: drawn, dropped, drawn again
    watch = _DropWatch(limit=200, max_share=0.2, window=20)
    for _ in range(100):
        watch.dropped(EpisodeDropped("prompt", "the prompt leaves no room to generate"))
        watch.ok()


def test_drop_share_names_the_most_common_cause_within_the_window():
    watch = _DropWatch(limit=200, max_share=0.5, window=10)
    for _ in range(10):  # earlier: engine drops among kept episodes
        watch.dropped(EpisodeDropped("engine", "ReadTimeout"))
        watch.ok()
        watch.ok()
    # 60% dropped at the 4th sandbox drop: 4 of them and 2 engine drops in the window
    # (over the whole run the engine's 10 would have been named)
    with pytest.raises(AllEpisodesDropped, match=r"\(4x\): sandbox: session_lost"):
        for _ in range(10):
            watch.dropped(_dropped())


def test_drop_share_tolerates_a_share_at_the_limit():
    watch = _DropWatch(limit=200, max_share=0.2, window=20)
    for i in range(400):  # one drop in five: exactly the limit, never over it
        if i % 5 == 0:
            watch.dropped(_dropped())
        else:
            watch.ok()
