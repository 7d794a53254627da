"""PPO-clip loss: hand-computed tokens, gradients, optional terms, micro-batch invariance."""

import math

import pytest
import torch

from agent_spo.algo.loss import ppo_clip_loss


def _hand_batch():
    # logp_old = 0, so ratio = exp(logp_new). Row 0 has A = +1, row 1 has A = -1.
    ratios = torch.tensor([[1.5, 0.5, 3.0], [0.5, 20.0, 2.0]])
    logp_new = torch.log(ratios).requires_grad_(True)
    logp_old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # row 0's last token is padding / tool output
    return logp_new, logp_old, adv, mask


def test_hand_computed_loss_and_stats():
    logp_new, logp_old, adv, mask = _hand_batch()
    loss, st = ppo_clip_loss(logp_new, logp_old, adv, mask, normalizer=5)
    # token (A=+1, r=1.5): max(-1.5, -1.28) = -1.28   clipped high
    # token (A=+1, r=0.5): max(-0.5, -0.8)  = -0.5    unclipped
    # token (A=-1, r=0.5): max(0.5, 0.8)    =  0.8    clipped low
    # token (A=-1, r=20) : max(20, 1.28) = 20, dual-clip min(20, 10) = 10
    # token (A=-1, r=2)  : max(2, 1.28) = 2, below the dual cap 10: unclipped
    # loss = (-1.28 - 0.5 + 0.8 + 10 + 2) / 5 = 11.02 / 5 = 2.204
    assert loss.item() == pytest.approx(2.204)
    assert st.n_tokens == 5
    assert st.clip_frac == pytest.approx(0.4)
    assert st.clip_frac_low == pytest.approx(0.2) and st.clip_frac_high == pytest.approx(0.2)
    assert st.dual_clip_frac == pytest.approx(0.2)
    # ratio mean over masked tokens = (1.5 + 0.5 + 0.5 + 20 + 2)/5 = 4.9; padding's 3.0 ignored
    assert st.ratio_mean == pytest.approx(4.9) and st.ratio_max == pytest.approx(20.0)
    # approx_kl = mean(r - 1 - log r) over the five tokens
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 0.5, 20.0, 2.0)) / 5
    assert st.approx_kl == pytest.approx(expected_kl)

    loss.backward()
    # d loss / d logp_new = -A * ratio / N on unclipped tokens, 0 on clipped/capped/masked:
    #   (A=+1, r=0.5): -0.5/5 = -0.1 ;  (A=-1, r=2): +2/5 = 0.4
    expected = torch.tensor([[0.0, -0.1, 0.0], [0.0, 0.0, 0.4]])
    torch.testing.assert_close(logp_new.grad, expected)


def test_dual_clip_can_be_disabled():
    logp_new, logp_old, adv, mask = _hand_batch()
    loss, st = ppo_clip_loss(logp_new, logp_old, adv, mask, normalizer=5, dual_clip_c=None)
    # the r = 20 token now costs 20: (-1.28 - 0.5 + 0.8 + 20 + 2)/5 = 21.02/5 = 4.204
    assert loss.item() == pytest.approx(4.204)
    assert st.dual_clip_frac == 0.0


def test_log_ratio_is_clamped():
    logp_new = torch.tensor([[50.0]], requires_grad=True)
    loss, st = ppo_clip_loss(
        logp_new, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), 1, dual_clip_c=None
    )
    # log-ratio clamped to 20: loss = exp(20) (A = -1, ratio above the clip) -- finite
    assert loss.item() == pytest.approx(math.exp(20.0))
    assert math.isfinite(st.approx_kl)
    loss.backward()
    assert logp_new.grad.item() == 0.0  # no gradient through the clamp

    low = torch.tensor([[-50.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(low, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 1)
    # clamped to -20; A = +1 and ratio below 1 - eps_low is not clipped for A > 0:
    # loss = -exp(-20) = -2.06e-9, and the clamp stops the gradient
    assert loss.item() == pytest.approx(-math.exp(-20.0))
    loss.backward()
    assert low.grad.item() == 0.0


def test_masked_positions_cannot_poison_the_loss():
    logp_new = torch.tensor([[-0.1, -float("inf"), float("nan")]], requires_grad=True)
    logp_old = torch.tensor([[-0.1, float("nan"), -float("inf")]])
    mask = torch.tensor([[1, 0, 0]])
    loss, st = ppo_clip_loss(logp_new, logp_old, torch.tensor([2.0]), mask, 1)
    # the one real token has ratio 1: loss = -2 * 1 / 1
    assert loss.item() == pytest.approx(-2.0) and math.isfinite(st.approx_kl)
    loss.backward()
    assert torch.isfinite(logp_new.grad).all()
    torch.testing.assert_close(logp_new.grad, torch.tensor([[-2.0, 0.0, 0.0]]))


def test_bfloat16_inputs_are_computed_in_float32():
    logp = torch.full((1, 2), -0.5, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = ppo_clip_loss(logp, logp.detach(), torch.tensor([1.2345678]), torch.ones(1, 2), 2)
    assert loss.dtype == torch.float32
    # ratio 1 everywhere: loss = -A = -1.2345678, not bf16's -1.234375
    assert loss.item() == pytest.approx(-1.2345678, abs=1e-6)


def test_optional_kl_and_entropy_terms():
    logp_new = torch.log(torch.tensor([[1.0, 1.0]])).requires_grad_(True)  # ratio 1, A = 0
    logp_old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    logp_ref = logp_new.detach() + math.log(2.0)
    entropy = torch.tensor([[0.7, 0.3]])
    loss, st = ppo_clip_loss(
        logp_new,
        logp_old,
        torch.tensor([0.0]),
        mask,
        2,
        kl_coef=0.1,
        logp_ref=logp_ref,
        entropy_coef=0.01,
        entropy=entropy,
    )
    # k3 with delta = log 2: 2 - 0.6931472 - 1 = 0.3068528 per token
    # loss = 0 + 0.1 * 0.3068528 - 0.01 * (0.7 + 0.3)/2 = 0.03068528 - 0.005 = 0.02568528
    assert loss.item() == pytest.approx(0.02568528, abs=1e-8)
    assert st.kl == pytest.approx(0.3068528, abs=1e-7) and st.entropy == pytest.approx(0.5)
    loss.backward()
    # d/d logp_new of kl_coef * k3 / N, with d k3 / d logp_new = -(e^delta - 1) = -1:
    #   0.1 * (-1) / 2 = -0.05 per token (the PPO term has A = 0)
    torch.testing.assert_close(logp_new.grad, torch.tensor([[-0.05, -0.05]]))
    with pytest.raises(ValueError, match="needs logp_ref"):
        ppo_clip_loss(logp_new, logp_old, torch.tensor([0.0]), mask, 2, kl_coef=0.1)


def test_argument_checks():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_clip_loss(x, torch.zeros(1, 3), torch.zeros(1), x, 1)
    with pytest.raises(ValueError, match="positive token count"):
        ppo_clip_loss(x, x, torch.zeros(1), x, 0)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        ppo_clip_loss(x, x, torch.zeros(1), x, 1, dual_clip_c=0.5)


class _TinyPolicy(torch.nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim, dtype=torch.float64)
        self.mix = torch.nn.Linear(dim, dim, dtype=torch.float64)
        self.head = torch.nn.Linear(dim, vocab, dtype=torch.float64)

    def token_logp(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(ids[:, t+1] | ids[:, t]) for t < T-1, padded with a zero column: [B, T]."""
        h = torch.tanh(self.mix(self.emb(ids[:, :-1])))
        logp = torch.log_softmax(self.head(h), dim=-1)
        picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T-1]
        return torch.cat([picked, picked.new_zeros(ids.shape[0], 1)], dim=1)


def _accumulated_grads(model, ids, logp_old, adv, mask, split, normalizer=None, **kw):
    """Sum of micro-batch gradients; normalizer None = each micro-batch's own token mean."""
    model.zero_grad()
    bounds = torch.tensor([0, *split]).cumsum(0).tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        m = mask[lo:hi]
        extra = {k: v[lo:hi] for k, v in kw.items()}
        norm = normalizer if normalizer is not None else m.sum().item()
        loss, _ = ppo_clip_loss(
            model.token_logp(ids[lo:hi]),
            logp_old[lo:hi],
            adv[lo:hi],
            m,
            norm,
            kl_coef=0.05 if extra else 0.0,
            **extra,
        )
        if normalizer is None:
            loss = loss / len(split)
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("split", [[2, 2, 2], [1, 5], [3, 1, 1, 1]])
def test_micro_batch_gradient_accumulation_equals_one_pass(split):
    torch.manual_seed(0)
    model = _TinyPolicy()
    ids = torch.randint(0, 11, (6, 9))
    with torch.no_grad():
        # behaviour log-probs from a slightly different policy so ratios are not all 1
        logp_old = model.token_logp(ids) + 0.3 * torch.randn(6, 9, dtype=torch.float64)
    adv = torch.randn(6, dtype=torch.float64)
    lengths = torch.tensor([8, 3, 5, 8, 1, 6])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).double()  # ragged trajectories
    mask[2, 1] = 0.0  # a tool-output token inside a trajectory carries no loss
    n_tokens = mask.sum().item()
    ref = {"logp_ref": logp_old - 0.1}

    full = _accumulated_grads(model, ids, logp_old, adv, mask, [6], n_tokens, **ref)
    micro = _accumulated_grads(model, ids, logp_old, adv, mask, split, n_tokens, **ref)
    for g_full, g_micro in zip(full, micro, strict=True):
        torch.testing.assert_close(g_micro, g_full, atol=1e-12, rtol=0)

    # Control: averaging each micro-batch over its own tokens is NOT the same gradient,
    # which is why the normaliser is an explicit argument.
    full_plain = _accumulated_grads(model, ids, logp_old, adv, mask, [6], n_tokens)
    wrong = _accumulated_grads(model, ids, logp_old, adv, mask, split, None)
    assert max((w - f).abs().max().item() for w, f in zip(wrong, full_plain, strict=True)) > 1e-4


def test_an_importance_weight_scales_each_tokens_term_and_its_gradient():
    logp_new, logp_old, adv, mask = _hand_batch()
    w = torch.tensor([[2.0, 0.5, 7.0], [1.0, 0.25, 3.0]])
    loss, st = ppo_clip_loss(logp_new, logp_old, adv, mask, normalizer=5, is_weight=w)
    # the hand-computed terms of test_hand_computed_loss_and_stats, each times its weight;
    # row 0's third token is masked: its weight 7 changes nothing
    assert loss.item() == pytest.approx((-1.28 * 2 - 0.5 * 0.5 + 0.8 + 10 * 0.25 + 2 * 3) / 5)
    assert st.clip_frac == pytest.approx(0.4)  # the clip is decided before the weight
    loss.backward()
    # unclipped token (A=+1, r=0.5): d/dlogp of -w*r = -w*r = -0.25
    assert logp_new.grad[0, 1].item() == pytest.approx(-0.5 * 0.5 / 5)
    with pytest.raises(ValueError, match="is_weight"):
        ppo_clip_loss(logp_new, logp_old, adv, mask, normalizer=5, is_weight=w[:, :2])


def test_importance_weights_are_prox_over_behaviour_and_the_cap_truncates():
    from agent_spo.algo.loss import importance_weights

    prox = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    behaviour = torch.tensor([-1.0, -1.0, -2.5, -40.0])
    w, cut = importance_weights(prox, behaviour)
    assert w.tolist() == pytest.approx([1.0, math.exp(-1), math.exp(2), math.exp(20)])
    assert not cut.any()  # no cap: nothing truncated (the log-ratio clamp still holds)
    w, cut = importance_weights(prox, behaviour, cap=2.0)
    assert w.tolist() == pytest.approx([1.0, math.exp(-1), 2.0, 2.0])
    assert cut.tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="cap must be > 0"):
        importance_weights(prox, behaviour, cap=0.0)
