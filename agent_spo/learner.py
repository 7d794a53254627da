"""The learner: log-probs of trainable tokens, PPO-clip updates, and weights for the engine.

One ``step(trajectories, adv)`` consumes one training batch:

* the batch is split into ``mini_batches`` optimizer steps (one pass, in order);
* each mini-batch is split into micro-batches of at most ``micro_batch_tokens`` tokens,
  whose gradients accumulate with the mini-batch's trainable-token count as the explicit
  normaliser, so the split never changes the gradient (token mean over the step);
* ``logp_old`` is the engine's behaviour log-probs (default: off-policy corrected by the
  PPO ratio), or the learner's own recomputation before the update (reference option);
* after the update the learner measures its drift d_s = mean |logp_after − logp_before|
  over the batch's trainable tokens: the quantity the ``kl_version`` discount sums (spec §1).
  With ``probe_tokens`` it is measured on a probe: whole trajectories drawn in a seeded
  order until they hold that many trainable tokens, scored before and after the update,
  instead of two extra passes over the whole batch (with ``logp_old="recompute"`` the
  "before" pass covers the whole batch anyway and the probe saves only the "after" one);
* log-probs never hold the positions × vocabulary logits: the model's body gives hidden
  states and only the rows that score response tokens go through the LM head, in chunks
  of ``logprob_chunk`` positions (:mod:`agent_spo.logprobs`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch

from agent_spo.algo.loss import ppo_clip_loss
from agent_spo.episode.trajectory import Trajectory
from agent_spo.logprobs import chunked_logprobs, head_matches, split_head


class _ClipKwargs(TypedDict):
    """The keyword arguments of ppo_clip_loss the learner fixes at construction."""

    eps_low: float
    eps_high: float
    dual_clip_c: float | None
    log_ratio_clamp: float


@dataclass(frozen=True)
class StepStats:
    """Means over the batch's trainable tokens unless said otherwise."""

    loss: float
    pg_loss: float
    clip_frac: float
    approx_kl: float  # k3(old || new) at the start of each mini-batch's update
    grad_norm: float  # before clipping, mean over optimizer steps
    drift: float  # d_s = mean |logp_after - logp_before|
    n_tokens: int  # trainable tokens in the batch
    n_trajectories: int
    optimizer_steps: int
    step_s: float  # wall time of the whole learner step


class Learner:
    """A causal LM trained by PPO-clip on trajectories; see the module docstring."""

    def __init__(
        self,
        model,
        *,
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        grad_clip: float = 1.0,
        mini_batches: int = 1,
        micro_batch_tokens: int = 4096,
        eps_low: float = 0.2,
        eps_high: float = 0.28,
        dual_clip_c: float | None = 10.0,
        log_ratio_clamp: float = 20.0,
        logp_old: Literal["behaviour", "recompute"] = "behaviour",
        pad_token_id: int = 0,
        share_prefix: bool = True,
        compute_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
        logprob_chunk: int | None = 1024,
        probe_tokens: int | None = None,
    ) -> None:
        self.model = model.train()
        self.device = next(model.parameters()).device
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay
        )
        self.grad_clip = grad_clip
        self.mini_batches = mini_batches
        self.micro_batch_tokens = micro_batch_tokens
        self.loss_kwargs: _ClipKwargs = {
            "eps_low": eps_low,
            "eps_high": eps_high,
            "dual_clip_c": dual_clip_c,
            "log_ratio_clamp": log_ratio_clamp,
        }
        if logp_old not in ("behaviour", "recompute"):
            raise ValueError(f"logp_old must be 'behaviour' or 'recompute', got {logp_old!r}")
        self.logp_old_mode = logp_old
        self.pad_token_id = pad_token_id
        # bf16 autocast on GPUs: matmuls in bf16, weights, optimizer state and the
        # log-softmax in float32 (None = compute in the weights' dtype).
        self.compute_dtype = compute_dtype
        if gradient_checkpointing:
            # Recompute activations in the backward pass instead of storing them. The
            # shared-prefix pass needs the layers' key/value cache, which checkpointed
            # layers do not return, so prefix sharing is off with it.
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            share_prefix = False
        self.gradient_checkpointing = gradient_checkpointing
        self.share_prefix = share_prefix  # run the batch's common opening tokens once
        # the body and the LM head, when head(body(x)) is the model's own logits; None =
        # full logits (logprob_chunk=None, or a model that scales or caps its logits)
        if logprob_chunk is not None and logprob_chunk < 1:
            raise ValueError(f"logprob_chunk must be >= 1 or None, got {logprob_chunk}")
        lean = logprob_chunk is not None and head_matches(model)
        self._lean = split_head(model) if lean else None
        self.logprob_chunk = logprob_chunk or 0
        if probe_tokens is not None and probe_tokens < 1:
            raise ValueError(f"probe_tokens must be >= 1 or None, got {probe_tokens}")
        self.probe_tokens = probe_tokens  # None: the drift over the whole batch
        self.version = 0

    # ------------------------------------------------------------------ log-probs
    def _micro_batches(self, trajs: Sequence[Trajectory]) -> Iterator[list[int]]:
        """Indices grouped so each group's padded size stays within micro_batch_tokens."""
        group: list[int] = []
        longest = 0
        for i, t in enumerate(trajs):
            n = len(t.token_ids)
            if group and max(longest, n) * (len(group) + 1) > self.micro_batch_tokens:
                yield group
                group, longest = [], 0
            group.append(i)
            longest = max(longest, n)
        if group:
            yield group

    def _forward(self, trajs: Sequence[Trajectory]) -> tuple[torch.Tensor, torch.Tensor]:
        """Response log-probs [B, R] (R = longest response) and the loss mask [B, R].

        The tokens every trajectory of the micro-batch opens with (system prompt, tool
        schemas: often most of a short episode) run once, and their keys/values are shared
        by the rows; gradients flow through them as through a full pass.
        """
        shared = self._shared_prefix_len(trajs) if self.share_prefix else 0
        n = max(len(t.token_ids) for t in trajs) - shared
        r = max(len(t.response_token_ids) for t in trajs)
        ids = torch.full((len(trajs), n), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(trajs), shared + n), dtype=torch.long)
        att[:, :shared] = 1
        index = torch.zeros((len(trajs), r), dtype=torch.long)  # logits row per response token
        target = torch.zeros((len(trajs), r), dtype=torch.long)
        mask = torch.zeros((len(trajs), r))
        for b, t in enumerate(trajs):
            p, resp = len(t.prompt_token_ids), t.response_token_ids
            ids[b, : len(t.token_ids) - shared] = torch.tensor(t.token_ids[shared:])
            att[b, : len(t.token_ids)] = 1
            index[b, : len(resp)] = torch.arange(p - 1 - shared, p - 1 - shared + len(resp))
            target[b, : len(resp)] = torch.tensor(resp)
            mask[b, : len(resp)] = torch.tensor(t.loss_mask, dtype=torch.float)
        kwargs: dict = {"use_cache": False}
        index, target = index.to(self.device), target.to(self.device)
        with torch.autocast(
            self.device.type, dtype=self.compute_dtype or torch.float32,
            enabled=self.compute_dtype is not None,
        ):  # fmt: skip
            if shared:
                head = torch.tensor([trajs[0].token_ids[:shared]], device=self.device)
                prefix_model = self._lean[0] if self._lean is not None else self.model
                cache = prefix_model(input_ids=head, use_cache=True).past_key_values
                cache.batch_repeat_interleave(len(trajs))
                pos = torch.arange(shared, shared + n, device=self.device)
                kwargs = {"past_key_values": cache, "position_ids": pos[None].expand(len(trajs), n),
                          "use_cache": True}  # fmt: skip
            inputs = {"input_ids": ids.to(self.device), "attention_mask": att.to(self.device)}
            if self._lean is not None:
                body, lm_head = self._lean
                hidden = body(**inputs, **kwargs).last_hidden_state  # [B, n, H]
                rows = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
                flat = torch.tensor(  # (row, position) of every real response token
                    [b * r + i for b, t in enumerate(trajs) for i in range(len(t.response_token_ids))],
                    device=self.device,
                )  # fmt: skip
                picked = chunked_logprobs(
                    rows.reshape(-1, rows.shape[-1]).index_select(0, flat), lm_head,
                    target.reshape(-1).index_select(0, flat), self.logprob_chunk,
                )  # fmt: skip
                logp = torch.zeros(len(trajs) * r, dtype=picked.dtype, device=self.device)
                logp = logp.index_copy(0, flat, picked).view(len(trajs), r)
                return logp, mask.to(self.device)
            logits = self.model(**inputs, **kwargs).logits  # [B, n, V]
        rows = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16 -> fp32
        logp = torch.log_softmax(rows, dim=-1)  # [B, R, V]
        return logp.gather(2, target[..., None]).squeeze(2), mask.to(self.device)

    @staticmethod
    def _shared_prefix_len(trajs: Sequence[Trajectory], minimum: int = 16) -> int:
        """Length of the token prefix all rows share, ending before every row's last
        prompt token (whose logits score the first response token); 0 if too short."""
        limit = min(len(t.prompt_token_ids) for t in trajs) - 1
        first = trajs[0].prompt_token_ids
        k = 0
        while k < limit and all(t.prompt_token_ids[k] == first[k] for t in trajs):
            k += 1
        return k if k >= minimum and len(trajs) > 1 else 0

    @torch.no_grad()
    def token_logprobs(self, trajs: Sequence[Trajectory]) -> list[torch.Tensor]:
        """The current policy's log-prob of every response token, per trajectory (CPU),
        in eval mode (no dropout noise in logp_old or the drift)."""
        self.model.eval()
        out: list[torch.Tensor] = [torch.empty(0)] * len(trajs)
        for group in self._micro_batches(trajs):
            logp, _ = self._forward([trajs[i] for i in group])
            for row, i in enumerate(group):
                out[i] = logp[row, : len(trajs[i].response_token_ids)].cpu()
        return out

    # ------------------------------------------------------------------ the update
    def step(self, trajs: Sequence[Trajectory], adv: Sequence[float]) -> StepStats:
        """One batch: mini-batch optimizer steps over micro-batches; returns stats."""
        if len(trajs) != len(adv) or not trajs:
            raise ValueError(f"need one advantage per trajectory, got {len(trajs)} and {len(adv)}")
        t0 = time.perf_counter()
        probe = self._probe(trajs)
        if self.logp_old_mode == "recompute":
            full = self.token_logprobs(trajs)
            old, before = full, [full[i] for i in probe]
        else:
            old = [torch.tensor(t.logprobs, dtype=torch.float64) for t in trajs]  # exact floats
            before = self.token_logprobs([trajs[i] for i in probe])
        k = min(self.mini_batches, len(trajs))
        bounds = [round(j * len(trajs) / k) for j in range(k + 1)]
        totals = {"loss": 0.0, "pg_loss": 0.0, "clip": 0.0, "kl": 0.0, "norm": 0.0}
        n_tokens = 0
        self.model.train()
        for j in range(k):
            idx = list(range(bounds[j], bounds[j + 1]))
            mini = [trajs[i] for i in idx]
            normalizer = float(sum(sum(t.loss_mask) for t in mini))
            if normalizer == 0:
                continue
            self.opt.zero_grad(set_to_none=True)
            for group in self._micro_batches(mini):
                sub = [mini[g] for g in group]
                logp, mask = self._forward(sub)  # [b, R]
                lo = torch.zeros_like(logp)
                for row, g in enumerate(group):
                    o = old[idx[g]]
                    lo[row, : len(o)] = o.to(lo.device)
                a = torch.tensor([float(adv[idx[g]]) for g in group], device=logp.device)
                loss, st = ppo_clip_loss(logp, lo, a, mask, normalizer, **self.loss_kwargs)
                loss.backward()
                totals["loss"] += float(loss.detach())
                totals["pg_loss"] += st.pg_loss
                totals["clip"] += st.clip_frac * st.n_tokens
                totals["kl"] += st.approx_kl * st.n_tokens
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            totals["norm"] += float(norm)
            self.opt.step()
            n_tokens += int(normalizer)
        self.opt.zero_grad(set_to_none=True)
        self.version += 1
        after = self.token_logprobs([trajs[i] for i in probe])
        masks = [torch.tensor(trajs[i].loss_mask, dtype=torch.bool) for i in probe]
        diff = torch.cat([(a - b).abs()[m] for a, b, m in zip(after, before, masks, strict=True)])
        return StepStats(
            loss=totals["loss"] / k,
            pg_loss=totals["pg_loss"] / k,
            clip_frac=totals["clip"] / max(1, n_tokens),
            approx_kl=totals["kl"] / max(1, n_tokens),
            grad_norm=totals["norm"] / k,
            drift=float(diff.mean()) if diff.numel() else 0.0,
            n_tokens=n_tokens,
            n_trajectories=len(trajs),
            optimizer_steps=k,
            step_s=time.perf_counter() - t0,
        )

    def _probe(self, trajs: Sequence[Trajectory]) -> list[int]:
        """Indices of the trajectories the drift is measured on: all of them, or whole
        trajectories in a seeded order (new each version) until they hold probe_tokens
        trainable tokens."""
        if self.probe_tokens is None:
            return list(range(len(trajs)))
        order = list(range(len(trajs)))
        random.Random(self.version).shuffle(order)
        chosen, tokens = [], 0
        for i in order:
            if tokens >= self.probe_tokens:
                break
            chosen.append(i)
            tokens += sum(trajs[i].loss_mask)
        return sorted(chosen)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Detached weights to push into an engine (tied copies listed once)."""
        seen: set[int] = set()
        for name, p in self.model.state_dict().items():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            yield name, p.detach()
