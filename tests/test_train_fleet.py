"""`agent-spo train` on a fleet: the demo model served by two `agent-spo engine serve`
replicas and, where vLLM is installed, a vLLM one; weights synced to all of them after
every step, over gloo (SPO, colocated) or through the disk path (GRPO)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from agent_spo.cli import app
from agent_spo.cli.train import fleet_text
from agent_spo.engines.base import Sampling
from agent_spo.engines.openai_http import OpenAIHTTPEngine
from agent_spo.engines.replicas import LocalReplica

pytestmark = pytest.mark.slow

SMALL = [
    "learner.batch_size=4", "rollout.workers=4", "sandbox.pool_size=2",
    "rollout.max_response_tokens=128", "data.synthetic_tasks=40", "learner.lr=1e-4",
    "train.checkpoint_every=1", "train.eval_every=0", "algo.init.mode=none",
]  # fmt: skip


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from agent_spo.demo.build import ensure_demo_model

    model = ensure_demo_model(log=lambda _: None)
    logs = tmp_path_factory.mktemp("replica_logs")
    fleet = [LocalReplica(model, log_path=logs / f"r{i}.log") for i in range(2)]
    if importlib.util.find_spec("vllm") is not None:
        fleet.append(LocalReplica(model, extra=["--backend", "vllm"], threads=2,
                                  log_path=logs / "vllm.log"))  # fmt: skip
    try:
        for r in fleet:
            r.start(timeout_s=300)
        yield model, fleet
    finally:
        for r in fleet:
            r.stop()


@pytest.fixture(scope="module")
def sandbox_servers():
    """Two `agent-spo sandbox serve` servers with a token, as a user starts them."""
    procs = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        for _ in range(2):
            p = subprocess.Popen(
                [sys.executable, "-m", "agent_spo.cli", "sandbox", "serve", "--port", "0",
                 "--workers", "1", "--token", TOKEN],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                start_new_session=True,
            )  # fmt: skip
            procs.append(p)
        urls = [p.stdout.readline().split()[0] for p in procs]  # type: ignore[union-attr]
        assert all(u.startswith("http://127.0.0.1:") for u in urls), urls
        yield urls
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


TOKEN = "fleet-test-token"


@pytest.mark.parametrize(
    "algo, sync, colocate",
    # both algorithms, both sync paths, colocated and not, in two runs; the second with
    # `cluster.backend: urls`: replicas and sandbox servers the user started
    [("spo", "gloo", True), ("grpo", "disk", False)],
)
def test_the_demo_trains_on_two_replicas_and_every_replica_ends_on_the_learners_weights(
    replicas, sandbox_servers, tmp_path, monkeypatch, algo, sync, colocate
):
    """SPO also runs colocated: every replica sleeps through each learner step."""
    model, fleet = replicas
    for r in fleet:  # each run starts the replicas from the demo model's weights
        # (a fresh vLLM server reports its version as "default")
        if httpx.get(r.url + "/weight_info").json()["weight_version"] not in ("0", "default"):
            r.kill()
            r.start()
    urls = "[" + ", ".join(r.url for r in fleet) + "]"
    extra = ["algo.name=grpo", "algo.grpo.group_size=2"] if algo == "grpo" else []
    if algo == "grpo":
        monkeypatch.setenv("AGENT_SPO_SANDBOX_TOKEN", TOKEN)
        extra += ["cluster.backend=urls", "sandbox.backend=remote",
                  f"sandbox.urls=[{', '.join(sandbox_servers)}]"]  # fmt: skip
    result = CliRunner().invoke(app, [
        "train", *SMALL, *extra, f"run.output_dir={tmp_path}", "run.name=t",
        "train.total_steps=2", "rollout.engine=openai_http", f"rollout.urls={urls}",
        f"model.path={model}", f"rollout.weight_sync={sync}", f"rollout.colocate={colocate}",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    run = tmp_path / "t"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["perf/weight_sync_bytes"] > 0 and row["rollout/replicas_live"] == len(fleet)
        assert ("perf/engine_sleep_s" in row) == colocate
        for i in range(len(fleet)):
            assert row[f"rollout/replica{i}_version"] == row["step"]
    assert all(rows[-1][f"rollout/replica{i}_requests"] > 0 for i in range(len(fleet)))
    if algo == "grpo":  # the user's sandbox servers ran the tool calls, as one fleet
        assert all(row["sandbox/servers_live"] == 2 for row in rows)
        assert rows[-1]["sandbox/server0_served"] + rows[-1]["sandbox/server1_served"] > 0
        line = fleet_text(rows[-1])  # the progress line's fleet part
        assert line == f"  engines {len(fleet)}/{len(fleet)}  sandboxes 2/2"
    if sync == "disk":
        assert sorted(p.name for p in (run / "weights").iterdir()) == ["v000002"]
    else:
        assert not (run / "weights").exists()  # streamed: nothing written
    episodes = [json.loads(x) for x in (run / "episodes.jsonl").read_text().splitlines()]
    assert {s["policy_version"] for e in episodes for s in e["segments"]
            if s["kind"] == "model"} <= {0, 1}  # fmt: skip

    # each replica samples with the learner's weights: its log-probs are a forward pass
    # of the last checkpoint's model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = run / "checkpoints" / "ckpt-000002" / "model"
    learned = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    prompt = tok("What is 12 + 30?").input_ids

    async def sample(url):
        async with OpenAIHTTPEngine(url, token_versions=True) as c:
            return await c.generate(prompt, Sampling(max_tokens=12, temperature=0))

    for r in fleet:
        assert httpx.get(r.url + "/weight_info").json()["weight_version"] == "2"
        gen = asyncio.run(sample(r.url))
        assert gen.policy_version == 2 or "vllm" in r.extra  # vLLM reports no token versions
        ids = torch.tensor([prompt + list(gen.token_ids)])
        with torch.no_grad():
            lp = torch.log_softmax(learned(ids).logits.float(), -1)[0]
        want = lp[len(prompt) - 1 : -1].gather(1, torch.tensor(gen.token_ids)[:, None])
        assert torch.allclose(torch.tensor(gen.logprobs), want.squeeze(1), atol=1e-4)


def test_training_with_no_replica_answering_fails_at_once_with_the_reason(replicas, tmp_path):
    from agent_spo.cli import EXIT_FAILED
    from agent_spo.engines.replicas import free_port

    model, _ = replicas
    result = CliRunner().invoke(app, [
        "train", *SMALL, f"run.output_dir={tmp_path}", "run.name=t", "train.total_steps=1",
        "rollout.engine=openai_http", f"rollout.url=http://127.0.0.1:{free_port()}",
        f"model.path={model}",
    ])  # fmt: skip
    assert result.exit_code == EXIT_FAILED, result.output
    text = " ".join(result.output.split())
    assert "rollout engine: no replica can serve: replica 0 (http://127.0.0.1:" in text
    assert not (tmp_path / "t" / "metrics.jsonl").exists()
