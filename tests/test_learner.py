"""The learner: exact log-probs, micro-batch invariance, the direction of an update,
drift, and a weight push that makes the engine sample from the updated policy."""

from __future__ import annotations

import asyncio
import copy
import math
import random

import pytest
import torch

from agent_spo.episode.trajectory import Segment, Trajectory
from agent_spo.learner import Learner


@pytest.fixture(scope="module")
def tok():
    from agent_spo.demo.tokenizer import train_tokenizer

    return train_tokenizer([f"What is {i} times {i + 7}? {i * (i + 7)}" for i in range(300)],
                           vocab_size=400)  # fmt: skip


def _model(tok, dtype=torch.float32):
    from agent_spo.demo.model import random_model

    return random_model(tok, seed=0, hidden=32, layers=2, heads=2).to(dtype)


def _trajectories(learner: Learner, n: int, vocab: int, seed: int = 0) -> list[Trajectory]:
    """Random prompt / model / tool / model trajectories whose behaviour log-probs are the
    learner's own (on-policy)."""
    rng = random.Random(seed)
    drafts = []
    for i in range(n):
        ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
        m1, tool, m2 = ids(rng.randint(1, 9)), ids(rng.randint(1, 6)), ids(rng.randint(1, 9))
        segs = [
            Segment("model", m1, [-1.0] * len(m1), 0),
            Segment("tool", tool),
            Segment("model", m2, [-1.0] * len(m2), 0),
        ]
        drafts.append(Trajectory(f"p{i}", ids(rng.randint(2, 12)), segs))
    logps = learner.token_logprobs(drafts)
    out = []
    for t, lp in zip(drafts, logps, strict=True):
        segs, k = [], 0
        for s in t.segments:
            n_s = len(s.token_ids)
            if s.kind == "model":
                segs.append(Segment("model", s.token_ids, lp[k : k + n_s].tolist(), 0))
            else:
                segs.append(s)
            k += n_s
        out.append(Trajectory(t.prompt_id, t.prompt_token_ids, segs))
    return out


def test_token_logprobs_equal_a_plain_forward_pass(tok):
    model = _model(tok)
    learner = Learner(copy.deepcopy(model), micro_batch_tokens=40)
    trajs = _trajectories(learner, 6, len(tok))
    for t, lp in zip(trajs, learner.token_logprobs(trajs), strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([t.token_ids])).logits.float(), -1)[0]
        p = len(t.prompt_token_ids)
        want = ref[p - 1 : -1].gather(1, torch.tensor(t.response_token_ids)[:, None]).squeeze(1)
        assert torch.allclose(lp, want, atol=1e-5)


def test_micro_batch_split_does_not_change_the_update(tok):
    """Token-mean over the step with an explicit normaliser: any split, same weights."""
    base = _model(tok, torch.float64)
    a = Learner(copy.deepcopy(base), lr=1e-2, micro_batch_tokens=10_000)
    b = Learner(copy.deepcopy(base), lr=1e-2, micro_batch_tokens=12)
    trajs = _trajectories(a, 8, len(tok))
    adv = [1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -2.0, 1.5]
    sa, sb = a.step(trajs, adv), b.step(trajs, adv)
    for (n, pa), (_, pb) in zip(
        a.model.named_parameters(), b.model.named_parameters(), strict=True
    ):
        assert torch.allclose(pa, pb, atol=1e-10), n
    assert sa.n_tokens == sb.n_tokens == sum(sum(t.loss_mask) for t in trajs)
    assert sa.loss == pytest.approx(sb.loss, abs=1e-7)  # summation order only


def test_positive_advantage_raises_and_negative_lowers_log_probs(tok):
    learner = Learner(_model(tok), lr=3e-3)
    good, bad = _trajectories(learner, 2, len(tok), seed=3)

    def total(t):
        lp = learner.token_logprobs([t])[0]
        return float(lp[torch.tensor(t.loss_mask, dtype=torch.bool)].sum())

    g0, b0 = total(good), total(bad)
    stats = learner.step([good, bad], [1.0, -1.0])
    assert total(good) > g0 and total(bad) < b0
    assert stats.drift > 0 and stats.optimizer_steps == 1 and learner.version == 1
    assert stats.clip_frac == 0.0  # on-policy first step: the ratio starts at 1


def test_recompute_equals_behaviour_when_on_policy(tok):
    base = _model(tok, torch.float64)
    a = Learner(copy.deepcopy(base), lr=1e-2, mini_batches=2)
    b = Learner(copy.deepcopy(base), lr=1e-2, mini_batches=2, logp_old="recompute")
    trajs = _trajectories(a, 4, len(tok), seed=5)
    a.step(trajs, [1.0, -1.0, 0.3, 0.7])
    b.step(trajs, [1.0, -1.0, 0.3, 0.7])
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_only_model_tokens_are_trained(tok):
    """Tool tokens after the last model turn carry no loss: changing them changes nothing,
    and the step's token count is the model tokens alone."""
    base = _model(tok, torch.float64)
    learners = [Learner(copy.deepcopy(base), lr=1e-2) for _ in range(2)]
    m = [7, 8, 9, 10]
    lp = learners[0].token_logprobs(
        [Trajectory("x", [3, 4, 5], [Segment("model", m, [-1.0] * 4, 0)])]
    )[0]
    model_seg = Segment("model", m, lp.tolist(), 0)
    a = Trajectory("x", [3, 4, 5], [model_seg, Segment("tool", [11, 12, 13, 14, 15])])
    b = Trajectory("x", [3, 4, 5], [model_seg, Segment("tool", [21, 22, 23, 24, 25])])
    sa = learners[0].step([a], [1.0])
    sb = learners[1].step([b], [1.0])
    assert sa.n_tokens == sb.n_tokens == 4 < len(a.response_token_ids)
    moved = False
    for pa, pb, p0 in zip(learners[0].model.parameters(), learners[1].model.parameters(),
                          base.parameters(), strict=True):  # fmt: skip
        assert torch.allclose(pa, pb, atol=1e-12)
        moved |= not torch.allclose(pa, p0)
    assert moved  # the advantage did train the model tokens


def test_weight_push_makes_the_engine_sample_the_updated_policy(tok):
    from agent_spo.engines.base import Sampling
    from agent_spo.engines.hf import HFEngine

    base = _model(tok)
    learner = Learner(copy.deepcopy(base), lr=1e-2)
    trajs = _trajectories(learner, 4, len(tok), seed=9)
    learner.step(trajs, [1.0, -1.0, 1.0, -1.0])
    prompt = list(trajs[0].prompt_token_ids)

    async def main():
        engine = HFEngine(copy.deepcopy(base), tok)
        before = await engine.generate(prompt, Sampling(max_tokens=6, temperature=0))
        await engine.update_weights(learner.named_weights(), learner.version)
        after = await engine.generate(prompt, Sampling(max_tokens=6, temperature=0))
        await engine.close()
        return before, after

    before, after = asyncio.run(main())
    assert after.policy_version == 1 and before.logprobs != after.logprobs
    probe = Trajectory("x", prompt, [Segment("model", after.token_ids, after.logprobs, 1)])
    lp = learner.token_logprobs([probe])[0]
    assert torch.allclose(lp, torch.tensor(after.logprobs), atol=1e-5)


def test_sharing_the_common_prompt_prefix_changes_nothing_but_cost(tok):
    """Rows that open with the same system prompt: the prefix runs once, same update."""
    base = _model(tok, torch.float64)
    a = Learner(copy.deepcopy(base), lr=1e-2, share_prefix=True)
    b = Learner(copy.deepcopy(base), lr=1e-2, share_prefix=False)
    head = list(range(5, 45))  # a 40-token "system prompt" every trajectory starts with
    drafts = _trajectories(b, 6, len(tok), seed=11)
    trajs = [Trajectory(t.prompt_id, head + list(t.prompt_token_ids), t.segments) for t in drafts]
    assert Learner._shared_prefix_len(trajs) == 40
    for x, y in zip(a.token_logprobs(trajs), b.token_logprobs(trajs), strict=True):
        assert torch.allclose(x, y, atol=1e-10)
    adv = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0]
    a.step(trajs, adv)
    b.step(trajs, adv)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-10)


def test_gradient_checkpointing_gives_the_same_update(tok):
    """Activations recomputed in the backward pass: same gradients, same weights."""
    base = _model(tok, torch.float64)
    a = Learner(copy.deepcopy(base), lr=1e-2, share_prefix=False)
    b = Learner(copy.deepcopy(base), lr=1e-2, gradient_checkpointing=True)
    assert b.model.is_gradient_checkpointing and not b.share_prefix
    trajs = _trajectories(a, 6, len(tok), seed=11)
    adv = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0]
    a.step(trajs, adv)
    b.step(trajs, adv)
    moved = 0.0
    for (n, pa), (_, pb), p0 in zip(a.model.named_parameters(), b.model.named_parameters(),
                                    base.parameters(), strict=True):  # fmt: skip
        assert torch.allclose(pa, pb, atol=1e-10), n
        moved = max(moved, (pa - p0).abs().max().item())
    assert moved > 1e-4


def test_bf16_autocast_keeps_float32_weights_and_close_log_probs(tok):
    base = _model(tok)
    full = Learner(copy.deepcopy(base), lr=1e-3)
    half = Learner(copy.deepcopy(base), lr=1e-3, compute_dtype=torch.bfloat16)
    trajs = _trajectories(full, 4, len(tok), seed=12)
    for a, b in zip(full.token_logprobs(trajs), half.token_logprobs(trajs), strict=True):
        assert b.dtype == torch.float32  # the log-softmax runs in float32
        assert torch.allclose(a, b, atol=0.05)
        assert not torch.equal(a, b)  # the matmuls did run in bfloat16
    stats = half.step(trajs, [1.0, -1.0, 0.5, -0.5])
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    assert stats.drift > 0 and stats.grad_norm > 0


def test_padding_share_counts_the_positions_rows_did_not_fill(tok):
    learner = Learner(_model(tok), lr=1e-3, share_prefix=False)
    trajs = _trajectories(learner, 2, len(tok), seed=4)
    lengths = [len(t.token_ids) for t in trajs]
    assert lengths[0] != lengths[1]
    stats = learner.step(trajs, [1.0, -1.0])  # one micro-batch of two rows, padded to the longer
    assert stats.pad_frac == pytest.approx(1 - sum(lengths) / (2 * max(lengths)))
    assert learner.step(trajs[:1], [1.0]).pad_frac == 0.0


def test_packed_micro_batches_equal_padded_ones(tok):
    """Sequences end to end in one row (position ids restarting, attention kept within each
    sequence) give the padded pass's log-probs and update, with no padding."""
    base = _model(tok, torch.float64)
    padded = Learner(copy.deepcopy(base), lr=1e-2, mini_batches=2, micro_batch_tokens=60,
                     share_prefix=False)  # fmt: skip
    packed = Learner(copy.deepcopy(base), lr=1e-2, mini_batches=2, micro_batch_tokens=60,
                     pack=True)  # fmt: skip
    trajs = _trajectories(padded, 8, len(tok), seed=2)
    assert len(list(packed._micro_batches(trajs))) < len(list(padded._micro_batches(trajs)))
    for a, b in zip(padded.token_logprobs(trajs), packed.token_logprobs(trajs), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    adv = [1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -2.0, 1.5]
    sa, sb = padded.step(trajs, adv), packed.step(trajs, adv)
    assert abs(sa.loss - sb.loss) < 1e-12 and sb.pad_frac == 0 < sa.pad_frac
    for pa, pb in zip(padded.model.parameters(), packed.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-10)


def test_packing_refuses_eager_attention(tok):
    """Eager attention adds the mask to its scores, so a boolean mask would not mask."""
    model = _model(tok)
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="learner.pack needs sdpa or flash attention"):
        Learner(model, pack=True)


def _behaviour_shifted(trajs: list[Trajectory], deltas: list[float]) -> list[Trajectory]:
    """The same trajectories sampled by a policy whose log-probs were lower by delta on
    every model token: the importance weight pi_prox / pi_behaviour is exp(delta)."""
    out = []
    for t, d in zip(trajs, deltas, strict=True):
        segs = [Segment("model", s.token_ids, [x - d for x in s.logprobs or ()], 0)
                if s.kind == "model" else s for s in t.segments]  # fmt: skip
        out.append(Trajectory(t.prompt_id, t.prompt_token_ids, segs))
    return out


@pytest.mark.parametrize("cap", [None, 2.0])
def test_decoupled_weights_each_token_by_prox_over_behaviour_truncated_at_the_cap(tok, cap):
    """At the start of a one-step update the ratio to the recomputed log-probs is 1, so
    the decoupled loss's gradient is -A * w * grad(logp): the same update as `recompute`
    with each trajectory's advantage multiplied by its (capped) weight exp(delta)."""
    base = _model(tok, torch.float64)
    probe = Learner(copy.deepcopy(base))
    on_policy = _trajectories(probe, 3, len(tok), seed=9)
    deltas = [0.0, 0.5, 2.0]
    stale = _behaviour_shifted(on_policy, deltas)
    adv = [1.0, -0.8, 0.6]
    a = Learner(copy.deepcopy(base), grad_clip=1e9, logp_old="decoupled", tis_cap=cap)
    b = Learner(copy.deepcopy(base), grad_clip=1e9, logp_old="recompute")
    for learner in (a, b):  # plain gradient steps: the weights move by the gradient itself
        learner.opt = torch.optim.SGD(learner.model.parameters(), lr=1.0)
    sa = a.step(stale, adv)
    w = [math.exp(d) if cap is None else min(math.exp(d), cap) for d in deltas]
    sb = b.step(on_policy, [x * wi for x, wi in zip(adv, w, strict=True)])
    moved = 0.0
    for pa, pb, p0 in zip(a.model.parameters(), b.model.parameters(), base.parameters(),
                          strict=True):  # fmt: skip
        # the weights reach the loss in the log-probs' float32: agreement to ~1e-7
        assert torch.allclose(pa, pb, rtol=0, atol=1e-6)
        moved = max(moved, float((pa - p0).detach().abs().max()))
    assert moved > 1e-3  # the step did move the weights
    assert sa.loss == pytest.approx(sb.loss, rel=1e-6)
    tokens = [sum(t.loss_mask) for t in stale]
    mean_w = sum(n * x for n, x in zip(tokens, w, strict=True)) / sum(tokens)
    assert sa.is_weight == pytest.approx(mean_w)
    if cap is None:
        assert sa.tis_frac is None
    else:  # the third trajectory's tokens, exp(2) > 2
        assert sa.tis_frac == pytest.approx(tokens[2] / sum(tokens))
    assert sb.is_weight is None and sb.tis_frac is None


def test_decoupled_on_policy_equals_recompute(tok):
    base = _model(tok, torch.float64)
    a = Learner(copy.deepcopy(base), lr=1e-2, mini_batches=2, logp_old="decoupled", tis_cap=2.0)
    b = Learner(copy.deepcopy(base), lr=1e-2, mini_batches=2, logp_old="recompute")
    trajs = _trajectories(a, 4, len(tok), seed=6)
    sa = a.step(trajs, [1.0, -1.0, 0.3, 0.7])
    b.step(trajs, [1.0, -1.0, 0.3, 0.7])
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-9)
    assert sa.is_weight == pytest.approx(1.0, abs=1e-9) and sa.tis_frac == 0.0


def test_a_cap_without_the_decoupled_objective_is_refused(tok):
    with pytest.raises(ValueError, match="tis_cap needs logp_old='decoupled'"):
        Learner(_model(tok), logp_old="recompute", tis_cap=2.0)


@pytest.mark.parametrize("chunk", [1024, None])  # the lean head, and the full logits
def test_the_entropy_bonus_moves_the_weights_by_its_own_gradient(tok, chunk):
    """With every advantage 0 the policy-gradient term is 0, so a plain gradient step
    moves the weights by entropy_coef x the gradient of the mean entropy over trainable
    positions, computed here independently from the model's full logits."""
    base = _model(tok, torch.float64)
    probe = Learner(copy.deepcopy(base))
    trajs = _trajectories(probe, 3, len(tok), seed=11)
    coef = 0.5
    a = Learner(copy.deepcopy(base), grad_clip=1e9, entropy_coef=coef, logprob_chunk=chunk)
    a.opt = torch.optim.SGD(a.model.parameters(), lr=1.0)
    stats = a.step(trajs, [0.0, 0.0, 0.0])
    ref = copy.deepcopy(base)
    total, n = 0.0, 0
    for t in trajs:
        logits = ref(torch.tensor([t.token_ids])).logits[0]
        p = len(t.prompt_token_ids)
        rows = logits[p - 1 : p - 1 + len(t.response_token_ids)]
        logp = torch.log_softmax(rows, -1)
        h = -(logp.exp() * logp).sum(-1)
        m = torch.tensor(t.loss_mask, dtype=torch.bool)
        total = total + h[m].sum()
        n += int(m.sum())
    mean_h = total / n
    grads = torch.autograd.grad(mean_h, list(ref.parameters()), allow_unused=True)
    for p_new, p0, g in zip(a.model.parameters(), base.parameters(), grads, strict=True):
        want = p0 + coef * (g if g is not None else 0.0)  # descent on -coef * H
        assert torch.allclose(p_new, want, rtol=0, atol=1e-6)
    assert stats.entropy == pytest.approx(float(mean_h.detach()), rel=1e-6)
    assert stats.pg_loss == 0.0
    assert stats.loss == pytest.approx(-coef * float(mean_h.detach()), rel=1e-6)
