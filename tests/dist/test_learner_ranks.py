"""The learner on two gloo ranks (real processes) against the one-process learner: the same
updates, log-probs and stats; sharded checkpoints read back at either world size; a rank
that dies, hangs or cannot start fails the call with a clear error."""

from __future__ import annotations

import os
import signal
import statistics
import time

import pytest
import torch
from test_learner import _trajectories

from agent_spo.dist.driver import LearnerGroup, RankFailed, RankSpec
from tests.dist.ranks import tiny_learner

FACTORY = "tests.dist.ranks:tiny_learner"
ADV = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.5, -1.5, 0.25, -0.25, 1.0, -1.0]
# several mini-batches, micro-batches of a few rows, 12 trajectories of uneven length
SETTINGS = {"lr": 1e-2, "mini_batches": 2, "micro_batch_tokens": 40}


def _start(world: int = 2, timeout_s: float = 60, factory: str = FACTORY, **kw) -> LearnerGroup:
    return LearnerGroup.start(RankSpec(factory, kw, world_size=world, timeout_s=timeout_s))


def _max_diff(a, b) -> list[float]:
    theirs = dict(b.named_weights())
    return [float((p - theirs[n]).abs().max()) for n, p in a.named_weights()]


@pytest.fixture
def float64_pair():
    """A one-process learner and a two-rank one from the same float64 weights."""
    kw = {**SETTINGS, "dtype": "float64"}
    group = _start(**kw)
    yield tiny_learner(rank=0, world_size=1, **kw), group
    group.close()


def test_two_ranks_score_and_train_like_one_process(float64_pair):
    single, group = float64_pair
    trajs = _trajectories(single, 12, 400, seed=3)
    for a, b in zip(single.token_logprobs(trajs), group.token_logprobs(trajs), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    shares = group.learner._shares(trajs)
    assert sorted(shares[0] + shares[1]) == list(range(12))
    for batch, adv in ((trajs, ADV), (trajs[:3], ADV[:3]), (trajs, ADV)):
        # a 3-trajectory batch in 2 mini-batches: one rank holds nothing of the first
        a, b = single.step(batch, adv), group.step(batch, adv)
        assert abs(a.loss - b.loss) < 1e-12 and abs(a.drift - b.drift) < 1e-12
        assert abs(a.grad_norm - b.grad_norm) < 1e-10
        assert a.clip_frac == pytest.approx(b.clip_frac, abs=1e-12)
        assert a.approx_kl == pytest.approx(b.approx_kl, abs=1e-12)
        assert (a.n_tokens, a.optimizer_steps) == (b.n_tokens, b.optimizer_steps)
    assert max(_max_diff(single, group)) < 1e-10
    assert group.version == single.version == 3


def test_float32_ranks_stay_within_rounding_of_one_process():
    """In float32 the ranks sum each gradient in another order; after three AdamW steps at
    lr 1e-2 (each step moves a weight by up to 1e-2) the weights differ by rounding."""
    kw = {**SETTINGS, "dtype": "float32"}
    single = tiny_learner(rank=0, world_size=1, **kw)
    trajs = _trajectories(single, 12, 400, seed=3)
    group = _start(**kw)
    try:
        for _ in range(3):
            a, b = single.step(trajs, ADV), group.step(trajs, ADV)
            assert abs(a.loss - b.loss) < 1e-6 and abs(a.drift - b.drift) < 1e-6
        diffs = _max_diff(single, group)
    finally:
        group.close()
    assert max(diffs) < 1e-4 and statistics.median(diffs) < 1e-5, diffs


def test_gradient_checkpointing_on_ranks_changes_nothing_but_memory():
    """FSDP2 with recomputed activations (the GPU default) against one plain process."""
    kw = {**SETTINGS, "dtype": "float64"}
    single = tiny_learner(rank=0, world_size=1, **kw)
    trajs = _trajectories(single, 8, 400, seed=6)
    group = _start(**kw, gradient_checkpointing=True)
    try:
        a, b = single.step(trajs, ADV[:8]), group.step(trajs, ADV[:8])
        diffs = _max_diff(single, group)
    finally:
        group.close()
    assert abs(a.loss - b.loss) < 1e-12 and max(diffs) < 1e-10
    assert b.pad_frac > a.pad_frac  # no shared opening across ranks; padding passes


def test_sharded_checkpoint_resumes_at_two_ranks_and_at_one(float64_pair, tmp_path):
    single, group = float64_pair
    trajs = _trajectories(single, 6, 400, seed=5)
    single.save_state(tmp_path / "one")
    other = tiny_learner(rank=0, world_size=1, seed=1, **{**SETTINGS, "dtype": "float64"})
    group.load_state(tmp_path / "one")  # one process -> two ranks
    other.load_state(tmp_path / "one")
    assert max(_max_diff(single, group)) == 0 and max(_max_diff(single, other)) == 0
    a, b = single.step(trajs, ADV[:6]), group.step(trajs, ADV[:6])
    assert abs(a.loss - b.loss) < 1e-12 and max(_max_diff(single, group)) < 1e-10
    group.save_state(tmp_path / "two")  # two ranks -> one process
    assert sorted(os.listdir(tmp_path / "two" / "state")) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp",
    ]  # fmt: skip
    other.load_state(tmp_path / "two")
    other.version = group.version
    a, b = other.step(trajs, ADV[:6]), group.step(trajs, ADV[:6])
    assert abs(a.loss - b.loss) < 1e-12 and max(_max_diff(other, group)) < 1e-10


def test_lora_on_two_ranks_trains_like_one_process_and_resumes(tmp_path):
    """FSDP2 with frozen base weights and trainable adapters in the same layers: the same
    update as one process, adapter-only weights gathered whole, shards of the adapter."""
    from agent_spo import lora

    kw = {**SETTINGS, "dtype": "float64", "lora_rank": 4}
    single = tiny_learner(rank=0, world_size=1, **kw)
    trajs = _trajectories(single, 8, 400, seed=7)
    group = _start(**kw)
    try:
        for _ in range(2):
            a, b = single.step(trajs, ADV[:8]), group.step(trajs, ADV[:8])
            assert abs(a.loss - b.loss) < 1e-12 and abs(a.grad_norm - b.grad_norm) < 1e-10
        assert max(_max_diff(single, group)) < 1e-10  # the merged weights
        theirs = dict(group.named_weights(adapter_only=True))
        mine = dict(single.named_weights(adapter_only=True))
        assert theirs.keys() == mine.keys() and all(lora.is_adapter(n) for n in mine)
        assert max(float((mine[n] - theirs[n]).abs().max()) for n in mine) < 1e-10
        assert group.summary() == single.summary()
        group.save_state(tmp_path / "two")
        other = tiny_learner(rank=0, world_size=1, **kw)
        other.load_state(tmp_path / "two")  # the adapter of two ranks into one process
        other.version = group.version
        a, b = other.step(trajs, ADV[:8]), group.step(trajs, ADV[:8])
        assert abs(a.loss - b.loss) < 1e-12 and max(_max_diff(other, group)) < 1e-10
    finally:
        group.close()


def _child(group: LearnerGroup, rank: int = 1):
    return group.group.children[rank]


def test_a_killed_rank_fails_the_step_with_its_exit():
    group = _start(timeout_s=60)
    trajs = _trajectories(tiny_learner(rank=0, world_size=1), 4, 400)
    try:
        os.kill(_child(group).pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) exited with signal SIGKILL"):
            group.step(trajs, ADV[:4])
        assert time.monotonic() - t0 < 30  # at once, not at the 60 s timeout
        with pytest.raises(RankFailed, match="failed earlier"):
            group.step(trajs, ADV[:4])
    finally:
        group.close()


def test_a_hung_rank_fails_the_step_after_the_timeout():
    group = _start(timeout_s=4)
    trajs = _trajectories(tiny_learner(rank=0, world_size=1), 4, 400)
    child = _child(group)
    try:
        os.kill(child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RankFailed, match="stopped answering .timeout 4s"):
            group.step(trajs, ADV[:4])
        assert time.monotonic() - t0 < 20
    finally:
        child.kill()
        group.close()


def test_an_error_every_rank_raises_is_reported_as_itself_and_ends_the_group():
    """A bad call fails on every rank: rank 0 reports the real error (not "rank 1 exited"),
    and the ranks it started are gone at once, not left inside a collective."""
    group = _start(timeout_s=60)
    trajs = _trajectories(tiny_learner(rank=0, world_size=1), 4, 400)
    child = _child(group)
    try:
        with pytest.raises(ValueError, match="need one advantage per trajectory"):
            group.step(trajs, ADV[:3])
        child.wait(timeout=10)
        with pytest.raises(RankFailed, match="failed earlier: need one advantage"):
            group.step(trajs, ADV[:4])
    finally:
        group.close()


def test_a_rank_that_cannot_build_its_learner_fails_the_start():
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) exited with code 3"):
        _start(factory="tests.dist.ranks:broken_learner", timeout_s=60)
    assert time.monotonic() - t0 < 30


def test_a_slow_start_is_bounded_by_the_start_timeout_not_the_command_timeout():
    """Building a learner (imports, weights) may take longer than one command may: a
    2 s command timeout does not fail a rank that needs 4 s to build."""
    group = _start(factory="tests.dist.ranks:slow_learner", timeout_s=2, build_s=4.0)
    group.close()
    with pytest.raises(RankFailed, match="did not build its learner: nothing within 3s"):
        LearnerGroup.start(
            RankSpec("tests.dist.ranks:slow_learner", {"build_s": 30.0}, world_size=2,
                     timeout_s=1, start_timeout_s=3)
        )  # fmt: skip


def test_export_of_a_two_rank_checkpoint_scores_like_the_ranks(float64_pair, tmp_path):
    """`agent-spo export` reads the shards in one process into a model directory whose
    transformers log-probs are the two-rank learner's."""
    from transformers import AutoModelForCausalLM

    from agent_spo.checkpoint import save_checkpoint
    from agent_spo.export import export

    single, group = float64_pair
    trajs = _trajectories(single, 6, 400, seed=11)
    group.step(trajs, ADV[:6])  # weights no longer the ones every rank started from
    save_checkpoint(tmp_path / "ckpts", step=1, learner=group, tokenizer=None, tracker={},
                    sampler={}, learner_version=group.version)  # fmt: skip
    out = export(tmp_path / "ckpts", tmp_path / "exported", log=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.float32
    model = model.double()
    ours = group.token_logprobs(trajs)
    for t, lp in zip(trajs, ours, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([t.token_ids])).logits[0]
        ref = torch.log_softmax(logits, -1)
        p = len(t.prompt_token_ids)
        want = ref[p - 1 : -1].gather(1, torch.tensor(t.response_token_ids)[:, None]).squeeze(1)
        # the export is in the model config's dtype (float32), the ranks train float64
        assert torch.allclose(lp, want, rtol=0, atol=1e-5)
