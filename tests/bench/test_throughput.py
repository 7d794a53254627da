"""The throughput benchmark: modelled episode times, their expected timeline, the delay
wrapper, and the real pipeline (train_spo / train_grpo, runner, sandbox, verifier,
learner) with stragglers (spec §8)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time

import numpy as np
import pytest
from fakes import ScriptedEngine

from agent_spo.bench.stragglers import (
    PAPER_GROUP_MAX_S,
    DelayedEngine,
    DelayModel,
    paper_times,
    simulate,
)
from agent_spo.engines.base import Sampling

# ------------------------------------------------------------------ modelled times


def test_paper_times_are_the_papers_groups_and_stream():
    t = paper_times()
    assert t.shape == (48,)
    groups = t.reshape(6, 8)  # consecutive blocks of 8 are the paper's six groups
    assert groups.max(axis=1).tolist() == list(PAPER_GROUP_MAX_S)
    # B = 24 from groups: the 3 fastest groups' slowest members are 130, 133, 486
    assert sorted(groups.max(axis=1))[2] == 486.0
    # B = 24 without groups: the 24th fastest of the same 48
    assert np.sort(t)[23] == pytest.approx(112.0)
    assert np.sort(t)[22] < 112.0 < np.sort(t)[24]


def test_paper_case_timeline_gives_486_against_112_at_scale():
    scale = 0.01
    spo = simulate("spo", DelayModel("paper", time_scale=scale).sequence(),
                   batch=24, workers=48, steps=1)  # fmt: skip
    grpo = simulate("grpo", DelayModel("paper", time_scale=scale).sequence(),
                    batch=24, workers=48, steps=1, group_size=8)  # fmt: skip
    assert grpo.first_batch_s == pytest.approx(4.86)  # 486 s × 0.01
    assert spo.first_batch_s == pytest.approx(1.12)  # 112 s × 0.01
    assert grpo.first_batch_s / spo.first_batch_s == pytest.approx(486 / 112)  # 4.34
    assert spo.trajectories == grpo.trajectories == 24


def test_zero_variance_times_give_no_advantage_to_the_stream():
    def run(mode):
        return simulate(mode, DelayModel("constant", time_scale=1).sequence(),
                        batch=24, workers=48, steps=6, group_size=8)  # fmt: skip

    spo, grpo = run("spo"), run("grpo")
    # all 48 finish together every 100 s: two batches per 100 s in both modes
    assert spo.batch_ready_s == grpo.batch_ready_s == (100.0, 100.0, 200.0, 200.0, 300.0, 300.0)


def test_heavy_tails_favour_the_stream_in_steady_state_too():
    # W/E[T] against W/E[max of G]: the ratio is E[max_8 T]/E[T] > 1, smaller than the
    # first-batch ratio because stragglers of a cohort stay in flight for the next batch
    for name in ("paper", "lognormal", "pareto"):
        m = DelayModel(name, time_scale=1)
        spo = simulate("spo", m.sequence(), batch=24, workers=48, steps=40)
        grpo = simulate("grpo", m.sequence(), batch=24, workers=48, steps=40)
        assert spo.batches_per_s / grpo.batches_per_s > 1.8, name


def test_stale_stragglers_are_dropped_as_in_the_pipeline():
    # one straggler of 10 s among 1 s episodes, 1 worker per batch slot: by the time it
    # finishes the learner has moved 9 versions on
    times = itertools.chain([10.0], itertools.repeat(1.0))
    tl = simulate("spo", times, batch=1, workers=2, steps=12, max_staleness=4)
    assert tl.dropped_stale == 1
    assert tl.trajectories == 12


def test_lognormal_and_pareto_have_the_requested_median_and_tail():
    n = 200_000
    ln = DelayModel("lognormal", median_s=100, sigma=1.0, cap_s=1e9, seed=1)
    x = np.fromiter(ln.modelled(), float, n)
    assert np.median(x) == pytest.approx(100, rel=0.02)
    assert np.std(np.log(x)) == pytest.approx(1.0, rel=0.02)
    pa = DelayModel("pareto", median_s=100, alpha=1.5, cap_s=1e9, seed=1)
    y = np.fromiter(pa.modelled(), float, n)
    assert np.median(y) == pytest.approx(100, rel=0.02)
    # P(X > 10·median) = (x_min / (10·median))^α = 10^-α / 2 = 0.0158 at α = 1.5
    assert np.mean(y > 1000) == pytest.approx(10**-1.5 / 2, rel=0.1)
    assert y.min() >= 100 / 2 ** (1 / 1.5)


def test_draws_are_capped_scaled_and_reproducible():
    m = DelayModel("pareto", alpha=0.8, cap_s=300, time_scale=0.01, seed=3)
    a = list(itertools.islice(m.sequence(), 1000))
    assert max(a) == pytest.approx(3.0)  # α < 1: some draws exceed the cap
    assert a == list(itertools.islice(m.sequence(), 1000))
    assert a != list(itertools.islice(DelayModel("pareto", alpha=0.8, seed=4).sequence(), 1000))
    assert set(itertools.islice(DelayModel("constant", median_s=7).modelled(), 50)) == {7.0}
    replay = list(itertools.islice(DelayModel("paper", time_scale=1).modelled(), 96))
    assert replay[:48] == replay[48:] == paper_times().tolist()
    with pytest.raises(ValueError, match="unknown distribution"):
        DelayModel("weibull")
    with pytest.raises(ValueError, match="time_scale"):
        DelayModel("paper", time_scale=0)


# ------------------------------------------------------------------ the delay wrapper


def test_first_turns_take_their_draw_in_call_order_and_later_turns_none():
    inner = ScriptedEngine(reply=lambda ids: (9,), version=5, max_model_len=64, logprob=-0.1)
    eng = DelayedEngine(inner, iter([0.3, 0.1, 0.2]), [[1, 2], [3, 4]])
    s = Sampling(max_tokens=4)

    async def timed(ids, after=0.0):
        await asyncio.sleep(after)
        t0 = time.perf_counter()
        gen = await eng.generate(ids, s)
        return time.perf_counter() - t0, gen

    async def main():
        return await asyncio.gather(
            timed([1, 2]), timed([3, 4], 0.01), timed([1, 2, 9, 7], 0.02), timed([1, 2], 0.03)
        )

    (a, ga), (b, _), (c, _), (d, _) = asyncio.run(main())
    assert eng.drawn == [0.3, 0.1, 0.2]  # one draw per first turn, in the order asked
    assert 0.3 <= a < 0.45 and 0.1 <= b < 0.25 and 0.2 <= d < 0.35
    assert c < 0.05  # a later turn (context = prompt + model tokens) is not held
    assert ga.policy_version == 5 and eng.version == 5 and eng.max_model_len == 64
    assert inner.calls == 4  # every call reaches the real engine at once


# ------------------------------------------------------------------ the real pipeline


@pytest.fixture(scope="module")
def parts():
    """The demo's prompts, renderer, tools, sandbox and verifier, alive for the module."""
    from agent_spo import builders
    from agent_spo.bench.throughput import Parts
    from agent_spo.config import load_config

    cfg = load_config(None, [])
    train, _ = builders.build_datasets(cfg.data, 0)
    path = builders.resolve_model_path(cfg.model, log=lambda m: None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    toolbox = builders.build_toolbox(cfg.rollout)
    loop = asyncio.new_event_loop()
    with builders.build_verifier(cfg.verifier) as verifier:
        sandbox = builders.build_sandbox(cfg.sandbox)
        loop.run_until_complete(sandbox.__aenter__())
        try:
            yield cfg, loop, Parts(
                path, tok, builders.build_renderer(tok, cfg.rollout, toolbox), toolbox,
                builders.build_episode_settings(cfg.rollout, cfg.sandbox),
                {p.key: p for p in train[:200]}, sandbox, verifier,
            )  # fmt: skip
        finally:
            loop.run_until_complete(sandbox.__aexit__(None, None, None))
            loop.close()


def scripted_agent(tokenizer, first_turn_prompts) -> ScriptedEngine:
    """A real-protocol engine that costs nothing: a python call on the first turn, a
    boxed answer after the tool output. Its tokens are the demo tokenizer's, so the real
    learner trains on them."""
    from agent_spo.demo.demonstrations import answer_text, call_text

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    call = ids(call_text("hermes", "print(6 * 7)"))  # cut at its stop string, </tool_call>
    answer = [*ids(answer_text("42")), tokenizer.eos_token_id]  # cut at the stop token

    def reply(prompt_ids):
        return call if tuple(prompt_ids) in first_turn_prompts else answer

    return ScriptedEngine(reply=reply, tokenizer=tokenizer, logprob=-1.0)


def _side_by_side(parts, name: str, scale: float, steps: int = 1):
    from agent_spo.bench.throughput import run_mode

    cfg, loop, p = parts
    out = {}
    for mode in ("spo", "grpo"):
        out[mode] = loop.run_until_complete(run_mode(
            p, cfg, mode, batch=24, workers=48, steps=steps, group_size=8, seed=0,
            delays=DelayModel(name, time_scale=scale).sequence(),
            make_engine=lambda seed: scripted_agent(p.tokenizer, p.first_turn_prompts),
        ))  # fmt: skip
    return out["spo"], out["grpo"]


@pytest.mark.slow
def test_the_stream_assembles_the_papers_batch_faster_than_the_barrier(parts):
    spo, grpo = _side_by_side(parts, "paper", scale=0.02)
    # the barrier cannot be faster than its 3rd group's straggler (486 s × 0.02)
    assert grpo.first_batch_s >= 9.72
    assert spo.first_batch_s >= 2.24
    # free generation: the timeline is the paper's plus the sandbox's and verifier's
    # time, which a loaded machine stretches (0.5-1.5 s here); batches/s is not
    # asserted: with one step it is mostly the learner's step time
    assert grpo.first_batch_s / spo.first_batch_s > 2.0  # paper: 4.34; constant: ~1
    assert spo.trajectories == grpo.trajectories == 24
    for r in (spo, grpo):
        # one draw per episode attempt: at least one per finished episode, at most those
        # plus the ones in flight at the stop and the odd retry (an attempt the sandbox
        # failed on a loaded machine starts over and draws again)
        assert r.episodes <= r.delays_drawn <= r.episodes + 48 + 8
        assert 0 < r.idle_frac < 1


@pytest.mark.slow
def test_without_variance_the_barrier_costs_nothing(parts):
    # the same pipeline with every episode taking 5 s: the ratio must collapse to ~1, so
    # the test above measures the tail, not a difference between the two loops
    spo, grpo = _side_by_side(parts, "constant", scale=0.05)
    assert 5.0 <= spo.first_batch_s and 5.0 <= grpo.first_batch_s
    assert grpo.first_batch_s / spo.first_batch_s == pytest.approx(1.0, abs=0.35)


@pytest.mark.slow
def test_cli_runs_the_demo_engine_and_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from agent_spo.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, [
        "bench", "throughput", "sandbox.pool_size=2", "--no-demo", "--cases", "paper",
        "--steps", "1", "--repeats", "1", "--time-scale", "0.005", "--out", str(out),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    case = report["cases"]["paper"]
    assert case["paper"] == {
        "grpo_first_batch_s": pytest.approx(2.43), "spo_first_batch_s": pytest.approx(0.56),
        "first_batch_speedup": pytest.approx(486 / 112), "applies": True,
    }  # fmt: skip
    assert case["expected"]["grpo"]["first_batch_s"] == pytest.approx(2.43)
    # the real demo engine adds its own time, never removes the modelled one
    assert case["grpo"]["first_batch_s"] >= 2.43 and case["spo"]["first_batch_s"] >= 0.56
    assert math.isfinite(case["ratio"]["batches_per_s"])
    assert "paper_first_batch_speedup_ge_4" in report["targets"]
    assert "paper" in res.output and "first batch" in res.output


def test_cli_refuses_bad_cases_before_any_work():
    from typer.testing import CliRunner

    from agent_spo.cli import app

    res = CliRunner().invoke(app, ["bench", "throughput", "--cases", "paper,weibull"])
    assert res.exit_code == 2
    assert "weibull" in res.output
