"""`agent-spo rollout` when the engine fails: dead at the start, or killed mid-run.

Real parts throughout: a tiny random Qwen3 with the demo tokenizer, served by
``python -m agent_spo.engines.serve`` in a subprocess that the test kills, the HTTP
engine, the local sandbox and the verifier pool, driven through the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent_spo.cli import app
from agent_spo.cli.args import EXIT_FAILED
from agent_spo.engines.base import EngineError, Sampling
from agent_spo.engines.openai_http import OpenAIHTTPEngine
from agent_spo.episode.pool import drop_cause, job_failure
from agent_spo.episode.runner import EpisodeDropped

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen3 with the demo tokenizer and chat template (seconds to build)."""
    from agent_spo.data.synthetic import make_tasks
    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer

    tok = train_tokenizer([p.problem for p in make_tasks(200, seed=3)], vocab_size=400)
    out = tmp_path_factory.mktemp("tiny_policy")
    return save_model_dir(random_model(tok, seed=0, hidden=32, layers=1, heads=2), tok, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture
def server(model_dir, tmp_path):
    """`python -m agent_spo.engines.serve` on a free port: (process, url)."""
    port = _free_port()
    err = tmp_path / "server.err"
    with open(err, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent_spo.engines.serve", str(model_dir),
             "--port", str(port), "--max-batch", "4"],
            stdout=subprocess.PIPE, stderr=err_file, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "serving ... on URL" once it listens, "" if it died
    if "serving" not in line:
        proc.kill()
        pytest.fail(f"the server did not start: {line}{err.read_text()}")
    yield proc, f"http://127.0.0.1:{port}/v1"
    proc.kill()
    proc.wait()


def _rollout(tmp_path: Path, model_dir: Path, url: str, n: int):
    args = [
        "rollout", f"rollout.url={url}", "rollout.engine=openai_http", f"model.path={model_dir}",
        "rollout.max_turns=1", "rollout.max_response_tokens=4", "rollout.workers=2",
        "data.synthetic_tasks=40", f"run.output_dir={tmp_path}", "run.name=r", "--n", str(n),
    ]  # fmt: skip
    return runner.invoke(app, args)


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_dead_engine_at_the_start_fails_fast_in_one_line_naming_the_url(tmp_path, model_dir):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    t0 = time.perf_counter()
    result = _rollout(tmp_path, model_dir, url, n=4)
    took = time.perf_counter() - t0
    assert not isinstance(result.exception, EngineError), "a traceback, not a message"
    assert result.exit_code == EXIT_FAILED
    (line,) = _error_lines(result)
    assert url.removesuffix("/v1") in line and "ConnectError" in line
    assert took < 15  # four connection attempts with backoff (~3 s), not minutes


def test_an_engine_killed_mid_rollout_drains_fast_records_why_and_exits_1(
    tmp_path, model_dir, server
):
    proc, url = server
    n = 24
    log = tmp_path / "r" / "rollout.jsonl"
    killed_at: list[float] = []

    def kill_after_two_episodes() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log.exists() and log.read_text().count("\n") >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at.append(time.perf_counter())
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_two_episodes, daemon=True)
    watcher.start()
    result = _rollout(tmp_path, model_dir, url, n=n)
    ended = time.perf_counter()
    watcher.join()
    assert killed_at, "the rollout ended before two episodes were logged"
    drain_s = ended - killed_at[0]

    summary = json.loads(log.with_suffix(".summary.json").read_text())
    done = log.read_text().count("\n")
    assert summary["episodes"] == done and summary["episodes"] + summary["dropped"] == n
    assert 2 * summary["dropped"] > n  # most of the run was left when the engine died
    causes = summary["drop_causes"]
    assert sum(causes.values()) == summary["dropped"]
    assert len(causes) <= 3, causes  # a few buckets, not one line per episode
    main, _ = Counter(causes).most_common(1)[0]
    assert main.startswith("engine: ") and "ConnectError" in main
    assert result.exit_code == EXIT_FAILED
    (line,) = _error_lines(result)
    assert f"{summary['dropped']} of {n} episodes dropped" in line and main in line
    # in-flight requests: <= 3 retries with backoff (<= 3.5 s); then each episode fails
    # at once instead of retrying its own way through (~8 s each before)
    assert drain_s < 8, drain_s


def test_a_down_server_fails_later_requests_at_once_and_is_tried_again(model_dir):
    from agent_spo.engines.hf import HFEngine
    from agent_spo.engines.serve import serve_in_thread

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    sampling = Sampling(max_tokens=2)

    async def main():
        async with OpenAIHTTPEngine(
            url, model="tiny", max_model_len=64, retries=2, backoff_s=0.2, down_probe_s=1.0
        ) as e:
            t0 = time.perf_counter()
            with pytest.raises(EngineError, match="failed after 3 attempt"):
                await e.generate([1, 2, 3], sampling)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(5):
                with pytest.raises(EngineError, match="unreachable"):
                    await e.generate([1, 2, 3], sampling)
            later = time.perf_counter() - t0
            engine = HFEngine.from_pretrained(str(model_dir))
            with serve_in_thread(engine, model_name="tiny", port=port):
                await asyncio.sleep(1.0)  # the probe interval
                gen = await e.generate([1, 2, 3], sampling)
            return first, later, gen

    first, later, gen = asyncio.run(main())
    assert first >= 0.2  # two backoffs (0.1-0.2 s, 0.2-0.4 s)
    assert later < 0.1  # five requests, no retries, no backoff
    assert len(gen.token_ids) >= 1  # the server came back: the next probe reached it


@pytest.fixture
def served_in_thread(model_dir):
    """The tiny model served on a background thread (closed by the test to kill it)."""
    from agent_spo.engines.hf import HFEngine
    from agent_spo.engines.serve import serve_in_thread

    with serve_in_thread(HFEngine.from_pretrained(str(model_dir))) as srv:
        yield srv


def _kill_on_first(srv):
    def progress(_state) -> None:
        srv.close()  # idempotent: the later calls find it stopped

    return progress


def _engine_section(srv, model_dir: Path) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "rollout": {"engine": "openai_http", "url": srv.url, "workers": 2, "max_turns": 1,
                    "max_response_tokens": 4},
    }  # fmt: skip


def test_estimate_values_counts_drop_causes_and_fails_when_most_dropped(
    tmp_path, model_dir, served_in_thread
):
    from agent_spo.config import TrainConfig
    from agent_spo.values import estimate_from_config

    cfg = TrainConfig.model_validate({
        **_engine_section(served_in_thread, model_dir),
        "data": {"synthetic_tasks": 10}, "algo": {"init": {"n0": 2}},
    })  # fmt: skip
    out = tmp_path / "values.jsonl"
    t0 = time.perf_counter()
    state, _ = asyncio.run(
        estimate_from_config(
            cfg, out, log=lambda m: None, progress=_kill_on_first(served_in_thread)
        )
    )
    assert time.perf_counter() - t0 < 10
    n = 2 * state.prompts_total  # n0 = 2 per training prompt
    assert 2 * state.dropped > n and sum(state.drop_causes.values()) == state.dropped
    assert all(c.startswith("engine: ") for c in state.drop_causes)
    assert state.to_dict()["drop_causes"] == dict(state.drop_causes)
    why = state.failure()
    assert why is not None and why.startswith(f"{state.dropped} of {n} episodes dropped")


def test_eval_records_drop_causes_in_its_results(tmp_path, model_dir, served_in_thread):
    from agent_spo.evaluate.config import EvalConfig
    from agent_spo.evaluate.run import run_eval

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "problem": f"What is {i} + {i}?",
                                        "answer": str(2 * i)}) + "\n" for i in range(4)))  # fmt: skip
    cfg = EvalConfig.model_validate({
        **_engine_section(served_in_thread, model_dir),
        "run": {"name": "ev", "output_dir": str(tmp_path / "runs")},
        "verifier": {"workers": 1},
        "eval": {"datasets": [{"name": "d", "path": str(data)}], "n": 4},
    })  # fmt: skip
    results, _ = asyncio.run(
        run_eval(cfg, log=lambda m: None, progress=_kill_on_first(served_in_thread))
    )
    causes = Counter(results["drop_causes"])
    assert results["dropped_now"] >= 12 and sum(causes.values()) == results["dropped_now"]
    assert all(c.startswith("engine: ") for c in causes)
    played = results["generated"] + results["dropped_now"]
    assert played == 16 and job_failure(causes, played) is not None


def _dropped(source: str, reason: str) -> EpisodeDropped:
    return EpisodeDropped(source, reason)


def test_drop_causes_are_short_buckets():
    url = "http://10.0.0.7:8000/v1/completions"
    a = drop_cause(_dropped("engine", f"POST {url} failed after 4 attempt(s): HTTP 503: busy"))
    b = drop_cause(_dropped("prompt", "the prompt has 913 tokens; the context limit is 512"))
    c = drop_cause(_dropped("prompt", "the prompt has 1207 tokens; the context limit is 512"))
    d = drop_cause(_dropped("sandbox", "Traceback (most recent call last):\n" + "x" * 500))
    assert a == f"engine: POST {url} failed after N attempt(s): HTTP 503: busy"
    assert b == c == "prompt: the prompt has N tokens; the context limit is N"
    assert d == "sandbox: Traceback (most recent call last):"
    assert len(drop_cause(_dropped("sandbox", "y" * 500))) <= 160


def test_a_job_fails_when_more_than_half_its_episodes_dropped():
    causes = Counter({"engine: down": 5, "sandbox: busy": 1})
    assert job_failure(causes, played=12) is None  # 6 of 12: half is not most
    why = job_failure(causes, played=11)
    assert why == "6 of 11 episodes dropped; main cause (5): engine: down"
    assert job_failure(Counter(), played=0) is None


def test_estimate_values_with_a_dead_engine_exits_1_in_one_line(tmp_path, model_dir):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    args = ["estimate-values", f"rollout.url={url}", "rollout.engine=openai_http",
            f"model.path={model_dir}", "data.synthetic_tasks=10", "algo.init.n0=1",
            "--out", str(tmp_path / "v.jsonl")]  # fmt: skip
    result = runner.invoke(app, args)
    assert not isinstance(result.exception, EngineError), "a traceback, not a message"
    assert result.exit_code == EXIT_FAILED
    (line,) = _error_lines(result)
    assert "engine is unavailable" in line and url.removesuffix("/v1") in line
