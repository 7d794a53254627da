"""PPO-clip token loss with clip-higher and dual-clip (spec §3).

Per trainable token t, with a log-ratio clamped to ±``log_ratio_clamp``:

    ratio_t = exp(logp_new_t - logp_old_t)
    l_t     = max(-A * ratio_t, -A * clip(ratio_t, 1 - eps_low, 1 + eps_high))
    l_t     = min(l_t, -A * c)            if A < 0   (dual-clip, c = dual_clip_c)

    l_t     = w_t * l_t                   (optional importance weight, see below)

    loss    = sum_t mask_t * l_t / normalizer
            + kl_coef * sum_t mask_t * k3_t / normalizer         (optional)
            - entropy_coef * sum_t mask_t * H_t / normalizer     (optional)

with the k3 estimator ``k3 = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1``.

The decoupled (proximal) objective passes the learner's recomputed log-probs as
``logp_old`` (the trust region is centred on the policy as it is now) and, as
``is_weight``, each token's importance weight to the policy that sampled it,
``w_t = pi_prox / pi_behaviour``, truncated at a cap when one is set (truncated
importance sampling): :func:`importance_weights`. The weight is a constant of the
update (no gradient flows through it).

``normalizer`` is the number of loss tokens in the whole optimizer step, passed in by the
caller, so splitting a step into micro-batches and summing their gradients gives the
same gradient as one pass over the step ("token mean over the step").

Masked positions (prompt, tool output, padding) are replaced by zeros before any
arithmetic, so a -inf or NaN log-prob there cannot poison the loss. The loss is computed
in at least float32 even when the log-probs arrive in bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PolicyLossStats:
    """Detached diagnostics, as means over this call's masked tokens."""

    n_tokens: int  # masked tokens in this call; weight for averaging across micro-batches
    pg_loss: float  # sum of the clipped policy-gradient term / normalizer
    clip_frac: float  # share of tokens where the PPO clip bound the objective
    clip_frac_low: float  # ... at 1 - eps_low (A < 0)
    clip_frac_high: float  # ... at 1 + eps_high (A > 0)
    dual_clip_frac: float  # share of tokens where the dual-clip cap -A*c was taken
    approx_kl: float  # mean of k3(old || new) = (ratio - 1) - log ratio
    ratio_mean: float
    ratio_max: float
    kl: float | None  # mean k3 to the reference policy, if a KL term was given
    entropy: float | None  # mean token entropy, if given


def ppo_clip_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    normalizer: float,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float | None = 10.0,
    log_ratio_clamp: float = 20.0,
    kl_coef: float = 0.0,
    logp_ref: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO-clip loss over trainable tokens; returns (scalar loss, detached stats).

    Shapes: ``logp_new``, ``logp_old``, ``mask`` (and ``logp_ref``, ``entropy``) are
    [B, T]; ``adv`` is [B] (one advantage per trajectory, broadcast to its tokens) or
    [B, T]. ``mask`` is 1 on model-generated tokens and 0 on prompt, tool-output and
    padding tokens.
    """
    if logp_new.shape != logp_old.shape or logp_new.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: logp_new {tuple(logp_new.shape)}, "
            f"logp_old {tuple(logp_old.shape)}, mask {tuple(mask.shape)}"
        )
    if not normalizer > 0:
        raise ValueError(f"normalizer must be a positive token count, got {normalizer!r}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    dtype = torch.promote_types(logp_new.dtype, torch.float32)
    keep = mask.bool()  # [B, T]
    mask = keep.to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # [B, 1] broadcasts over T
    adv = adv.detach().to(dtype)
    logp_new = torch.where(keep, logp_new.to(dtype), 0.0)
    logp_old = torch.where(keep, logp_old.detach().to(dtype), 0.0)

    log_ratio = torch.clamp(logp_new - logp_old, -log_ratio_clamp, log_ratio_clamp)  # [B, T]
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if dual_clip_c is not None:
        pg_dual = torch.minimum(pg, -adv * dual_clip_c)
        dual_taken = (adv < 0) & (pg_dual < pg)
        pg = torch.where(adv < 0, pg_dual, pg)
    else:
        dual_taken = torch.zeros_like(mask, dtype=torch.bool)

    if is_weight is not None:
        if is_weight.shape != mask.shape:
            raise ValueError(
                f"shape mismatch: is_weight {tuple(is_weight.shape)}, mask {tuple(mask.shape)}"
            )
        pg = pg * torch.where(keep, is_weight.detach().to(dtype), 0.0)

    pg_loss = (pg * mask).sum() / normalizer
    loss = pg_loss
    kl_mean = None
    if kl_coef != 0.0:
        if logp_ref is None:
            raise ValueError("kl_coef != 0 needs logp_ref")
        logp_ref = torch.where(keep, logp_ref.detach().to(dtype), 0.0)
        delta = torch.clamp(logp_ref - logp_new, -log_ratio_clamp, log_ratio_clamp)
        k3 = torch.exp(delta) - delta - 1.0  # [B, T], >= 0
        loss = loss + kl_coef * (k3 * mask).sum() / normalizer
        kl_mean = _masked_mean(k3.detach(), mask)
    ent_mean = None
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs per-token entropy")
        entropy = torch.where(keep, entropy.to(dtype), 0.0)
        loss = loss - entropy_coef * (entropy * mask).sum() / normalizer
        ent_mean = _masked_mean(entropy.detach(), mask)
    elif entropy is not None:
        ent_mean = _masked_mean(torch.where(keep, entropy.detach().to(dtype), 0.0), mask)

    with torch.no_grad():
        clipped = pg_clipped > pg_unclipped  # the clip bound the objective
        low = clipped & (ratio < 1.0 - eps_low)
        high = clipped & (ratio > 1.0 + eps_high)
        lr_d = log_ratio.detach()
        ratio_d = ratio.detach()
        n_tok = int(mask.sum().item())
        stats = PolicyLossStats(
            n_tokens=n_tok,
            pg_loss=float(pg_loss.detach()),
            clip_frac=_masked_mean(clipped, mask),
            clip_frac_low=_masked_mean(low, mask),
            clip_frac_high=_masked_mean(high, mask),
            dual_clip_frac=_masked_mean(dual_taken, mask),
            approx_kl=_masked_mean(ratio_d - 1.0 - lr_d, mask),
            ratio_mean=_masked_mean(ratio_d, mask),
            ratio_max=float(ratio_d[mask > 0].max()) if n_tok else 0.0,
            kl=kl_mean,
            entropy=ent_mean,
        )
    return loss, stats


def importance_weights(
    logp_prox: torch.Tensor,
    logp_behaviour: torch.Tensor,
    cap: float | None = None,
    log_ratio_clamp: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, truncated)``: per token ``w = exp(logp_prox - logp_behaviour)`` (the log-ratio
    clamped to ±``log_ratio_clamp``), ``min(w, cap)`` when a cap is given, and where the
    cap took. ``logp_prox`` is the learner's policy before the update, ``logp_behaviour``
    the engine's sampling log-probs: the weight corrects both the lag of a stale
    trajectory and the engine/learner numerical mismatch."""
    if logp_prox.shape != logp_behaviour.shape:
        raise ValueError(
            f"shape mismatch: logp_prox {tuple(logp_prox.shape)}, "
            f"logp_behaviour {tuple(logp_behaviour.shape)}"
        )
    if cap is not None and not cap > 0:
        raise ValueError(f"the cap must be > 0, got {cap!r}")
    delta = (logp_prox.double() - logp_behaviour.double()).clamp(-log_ratio_clamp, log_ratio_clamp)
    w = torch.exp(delta)
    if cap is None:
        return w, torch.zeros_like(w, dtype=torch.bool)
    return torch.clamp(w, max=cap), w > cap


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    denom = mask.sum()
    if denom.item() == 0:
        return 0.0
    return float((x.to(mask.dtype) * mask).sum() / denom)
