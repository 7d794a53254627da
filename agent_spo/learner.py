"""The learner: log-probs of trainable tokens, PPO-clip updates, and weights for the engine.

One ``step(trajectories, adv)`` consumes one training batch:

* the batch is split into ``mini_batches`` optimizer steps (one pass, in order);
* each mini-batch is split into micro-batches of at most ``micro_batch_tokens`` tokens,
  whose gradients accumulate with the mini-batch's trainable-token count as the explicit
  normaliser, so the split never changes the gradient (token mean over the step);
* ``logp_old`` is the engine's behaviour log-probs (default: off-policy corrected by the
  PPO ratio), or the learner's own recomputation before the update (reference option),
  or (``decoupled``) the recomputation as the trust region's centre with each token
  weighted by its importance weight to the behaviour policy, truncated at ``tis_cap``
  when one is set (:func:`~agent_spo.algo.loss.importance_weights`);
* after the update the learner measures its drift d_s = mean |logp_after − logp_before|
  over the batch's trainable tokens: the quantity the ``kl_version`` discount sums (spec §1).
  With ``probe_tokens`` it is measured on a probe: whole trajectories drawn in a seeded
  order until they hold that many trainable tokens, scored before and after the update,
  instead of two extra passes over the whole batch (with ``logp_old="recompute"`` the
  "before" pass covers the whole batch anyway and the probe saves only the "after" one);
* with ``entropy_coef`` > 0 the loss subtracts ``entropy_coef`` × the mean entropy of the
  policy over the vocabulary at each trainable position (an entropy bonus; computed in
  the same chunked pass as the log-probs, its gradient included);
* log-probs never hold the positions × vocabulary logits: the model's body gives hidden
  states and only the rows that score response tokens go through the LM head, in chunks
  of ``logprob_chunk`` positions (:mod:`agent_spo.logprobs`).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypedDict

import torch

from agent_spo import lora
from agent_spo.algo.loss import importance_weights, ppo_clip_loss
from agent_spo.episode.trajectory import Trajectory
from agent_spo.logprobs import chunked_logprobs, head_matches, split_head, token_entropy


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
    pad_frac: float  # share of the update passes' token positions that were padding
    n_trajectories: int
    optimizer_steps: int
    step_s: float  # wall time of the whole learner step
    is_weight: float | None = None  # decoupled: mean importance weight, after the cap
    tis_frac: float | None = None  # decoupled with a cap: share of tokens it truncated
    entropy: float | None = None  # with an entropy bonus: mean token entropy (nats)


class _Scored(NamedTuple):
    logp: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R]
    entropy: torch.Tensor | None  # [B, R], when asked for

    @classmethod
    def of(cls, out: torch.Tensor, mask: torch.Tensor, entropy: bool) -> _Scored:
        return cls(out[0], mask, out[1]) if entropy else cls(out, mask, None)


class LearnerLike(Protocol):
    """What the trainer uses of a learner: a :class:`Learner` in this process, or the
    handle on one spread over ranks (:class:`agent_spo.dist.driver.LearnerGroup`)."""

    version: int

    def step(self, trajs: Sequence[Trajectory], adv: Sequence[float]) -> StepStats: ...

    def token_logprobs(self, trajs: Sequence[Trajectory]) -> list[torch.Tensor]: ...

    @property
    def lora(self) -> bool: ...  # trains a LoRA adapter

    def summary(self) -> dict[str, Any]: ...

    def named_weights(self, adapter_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]: ...

    def save_state(self, path, tokenizer=None) -> None: ...

    def load_state(self, path) -> None: ...

    def close(self) -> None: ...


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
        logp_old: Literal["behaviour", "recompute", "decoupled"] = "behaviour",
        tis_cap: float | None = None,
        entropy_coef: float = 0.0,
        pad_token_id: int = 0,
        share_prefix: bool = True,
        compute_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
        logprob_chunk: int | None = 1024,
        probe_tokens: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        cpu_offload: bool = False,
        fsdp: bool = False,
        pack: bool = False,
        model_dtype: str | None = None,
    ) -> None:
        self.model = model.train()
        # offloaded shards live on the CPU and every pass runs on the GPU
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if cpu_offload
            else next(model.parameters()).device
        )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank} of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.grad_clip = grad_clip
        self.mini_batches = mini_batches
        self.micro_batch_tokens = micro_batch_tokens
        self.loss_kwargs: _ClipKwargs = {
            "eps_low": eps_low,
            "eps_high": eps_high,
            "dual_clip_c": dual_clip_c,
            "log_ratio_clamp": log_ratio_clamp,
        }
        if logp_old not in ("behaviour", "recompute", "decoupled"):
            raise ValueError(
                f"logp_old must be 'behaviour', 'recompute' or 'decoupled', got {logp_old!r}"
            )
        if tis_cap is not None and (logp_old != "decoupled" or not tis_cap > 0):
            raise ValueError(f"tis_cap needs logp_old='decoupled' and > 0, got {tis_cap!r}")
        self.logp_old_mode = logp_old
        self.tis_cap = tis_cap
        if not entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef!r}")
        self.entropy_coef = float(entropy_coef)
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
        # the LM head runs over response positions only, in chunks, when head(body(x)) is
        # the model's own logits; else full logits (logprob_chunk=None, or a model that
        # scales or caps its logits)
        if logprob_chunk is not None and logprob_chunk < 1:
            raise ValueError(f"logprob_chunk must be >= 1 or None, got {logprob_chunk}")
        lean = logprob_chunk is not None and head_matches(model)
        if world_size > 1:
            # FSDP ranks must run the same collectives: a shared-opening pass on one rank's
            # micro-batch and not on another's would not match (see _plan)
            share_prefix = False
        # pack a micro-batch's sequences into one row instead of padding them
        self.pack = pack
        if pack:
            share_prefix = False
        attention = getattr(getattr(model, "config", None), "_attn_implementation", "")
        if pack and attention not in ("sdpa", "flash_attention_2", "flash_attention_3"):
            # eager attention adds the mask to the scores: a boolean mask would not mask
            raise ValueError(
                f"learner.pack needs sdpa or flash attention; this model uses {attention!r}"
            )
        self._mask_packs = pack and attention == "sdpa"
        self.share_prefix = share_prefix
        self._scorer = _Scorer(model, lean=lean, chunk=logprob_chunk or 0)
        # FSDP2 at world size > 1, with CPU offload, or when asked (a one-rank group: the
        # device check measures the sharded path on one GPU)
        self._sharded = world_size > 1 or cpu_offload or fsdp
        if self._sharded:
            from agent_spo.dist.fsdp import shard

            shard(
                self._scorer, model, bf16=compute_dtype == torch.bfloat16, cpu_offload=cpu_offload
            )
            if not cpu_offload:  # sharding may have moved the weights to the mesh's device
                self.device = next(model.parameters()).device
        # with LoRA only the adapters train: the optimizer holds them alone
        self.lora = lora.loads_adapters(model)
        self._scaling = lora.scalings(model) if self.lora else {}
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self._trainable:
            raise ValueError("the model has no trainable parameters")
        self.opt = torch.optim.AdamW(self._trainable, lr=lr, betas=betas, weight_decay=weight_decay)
        if probe_tokens is not None and probe_tokens < 1:
            raise ValueError(f"probe_tokens must be >= 1 or None, got {probe_tokens}")
        self.probe_tokens = probe_tokens  # None: the drift over the whole batch
        self.version = 0
        # the dtype the model's own config names (the learner trains float32 masters):
        # checkpoints record it so `export` writes the model as it came
        self.model_dtype = model_dtype
        self._positions = [0, 0]  # token positions the passes computed, and real ones

    def summary(self) -> dict[str, Any]:
        """What trains: parameter counts (full sizes, whatever the sharding), the AdamW
        state's bytes over all ranks (two float32 moments per trainable parameter), and
        the LoRA settings when adapters train."""
        trainable, total = lora.trainable_summary(self.model.parameters())
        out: dict[str, Any] = {
            "trainable_params": trainable,
            "total_params": total,
            "optimizer_bytes": sum(2 * p.numel() * p.element_size() for p in self._trainable),
        }
        if self.lora:
            config = self.model._agent_spo_lora
            out["lora"] = {"rank": config.r, "alpha": config.lora_alpha,
                           "layers": len(self._scaling)}  # fmt: skip
        return out

    # ------------------------------------------------------------------ log-probs
    def _micro_batches(self, trajs: Sequence[Trajectory]) -> Iterator[list[int]]:
        """Indices grouped so each group's size (padded, or packed end to end) stays
        within micro_batch_tokens; a longer trajectory makes a group of its own."""
        group: list[int] = []
        longest = total = 0
        for i, t in enumerate(trajs):
            n = len(t.token_ids)
            size = total + n if self.pack else max(longest, n) * (len(group) + 1)
            if group and size > self.micro_batch_tokens:
                yield group
                group, longest, total = [], 0, 0
            group.append(i)
            longest, total = max(longest, n), total + n
        if group:
            yield group

    @property
    def lean(self) -> bool:
        """Whether log-probs skip the positions × vocabulary logits (see the module doc)."""
        return self._scorer.lean

    def _forward(self, trajs: Sequence[Trajectory], entropy: bool = False) -> _Scored:
        """Response log-probs [B, R] (R = longest response), the loss mask [B, R], and
        with ``entropy`` each position's entropy over the vocabulary [B, R] (else None).

        The tokens every trajectory of the micro-batch opens with (system prompt, tool
        schemas: often most of a short episode) run once, and their keys/values are shared
        by the rows; gradients flow through them as through a full pass.
        """
        if self.pack:
            return self._forward_packed(trajs, entropy)
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
        self._positions[0] += len(trajs) * n  # computed, of which real:
        self._positions[1] += sum(len(t.token_ids) - shared for t in trajs)
        flat = torch.tensor(  # (row, position) of every real response token
            [b * r + i for b, t in enumerate(trajs) for i in range(len(t.response_token_ids))]
        )  # fmt: skip
        head = torch.tensor([trajs[0].token_ids[:shared]]) if shared else None
        dev = self.device
        with torch.autocast(
            dev.type, dtype=self.compute_dtype or torch.float32,
            enabled=self.compute_dtype is not None,
        ):  # fmt: skip
            out = self._scorer(
                ids.to(dev), att.to(dev), index.to(dev), target.to(dev), flat.to(dev),
                None if head is None else head.to(dev), entropy=entropy,
            )  # fmt: skip
        return _Scored.of(out, mask.to(dev), entropy)

    def _forward_packed(self, trajs: Sequence[Trajectory], entropy: bool = False) -> _Scored:
        """:meth:`_forward` with the micro-batch's sequences end to end in one row, no
        padding: position ids restart at each sequence, and attention stays within it (a
        flash-attention model reads the boundaries from the position ids; any other gets
        a block-diagonal causal mask, T x T booleans)."""
        lengths = [len(t.token_ids) for t in trajs]
        total, r = sum(lengths), max(len(t.response_token_ids) for t in trajs)
        starts = [sum(lengths[:b]) for b in range(len(trajs))]
        ids = torch.tensor([[tok for t in trajs for tok in t.token_ids]])
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        index = torch.zeros((len(trajs), r), dtype=torch.long)
        target = torch.zeros((len(trajs), r), dtype=torch.long)
        mask = torch.zeros((len(trajs), r))
        for b, t in enumerate(trajs):
            p, resp = len(t.prompt_token_ids), t.response_token_ids
            index[b, : len(resp)] = torch.arange(starts[b] + p - 1, starts[b] + p - 1 + len(resp))
            target[b, : len(resp)] = torch.tensor(resp)
            mask[b, : len(resp)] = torch.tensor(t.loss_mask, dtype=torch.float)
        flat = torch.tensor(
            [b * r + i for b, t in enumerate(trajs) for i in range(len(t.response_token_ids))]
        )  # fmt: skip
        att = None
        if self._mask_packs:
            seq = torch.repeat_interleave(torch.arange(len(trajs)), torch.tensor(lengths))
            causal = torch.ones(total, total, dtype=torch.bool).tril()
            att = (causal & (seq[:, None] == seq[None, :]))[None, None]
        self._positions[0] += total
        self._positions[1] += total
        dev = self.device
        with torch.autocast(
            dev.type, dtype=self.compute_dtype or torch.float32,
            enabled=self.compute_dtype is not None,
        ):  # fmt: skip
            out = self._scorer(
                ids.to(dev), None if att is None else att.to(dev), index.to(dev),
                target.to(dev), flat.to(dev), None, pos.to(dev), entropy=entropy,
            )  # fmt: skip
        return _Scored.of(out, mask.to(dev), entropy)

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

    # ------------------------------------------------------------------ ranks
    def _shares(self, trajs: Sequence[Trajectory]) -> list[list[int]]:
        """Every rank's indices of ``trajs``: whole trajectories, longest first, each to
        the rank with the fewest tokens so far. Every rank computes the same split, so
        nothing about it is communicated."""
        if self.world_size == 1:
            return [list(range(len(trajs)))]
        load = [0] * self.world_size
        shares: list[list[int]] = [[] for _ in range(self.world_size)]
        for i in sorted(range(len(trajs)), key=lambda i: (-len(trajs[i].token_ids), i)):
            r = min(range(self.world_size), key=lambda r: (load[r], r))
            load[r] += len(trajs[i].token_ids)
            shares[r].append(i)
        return [sorted(share) for share in shares]

    def _plan(self, trajs: Sequence[Trajectory]) -> list[list[int] | None]:
        """This rank's micro-batches of ``trajs`` (indices), padded with None to the most
        any rank has: sharded layers gather and reduce in every pass, so every rank must
        run as many passes (a padding pass contributes a zero gradient)."""
        plans = [
            [[share[g] for g in group] for group in self._micro_batches([trajs[i] for i in share])]
            for share in self._shares(trajs)
        ]
        mine: list[list[int] | None] = list(plans[self.rank])
        return mine + [None] * (max(map(len, plans)) - len(mine))

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    @torch.no_grad()
    def token_logprobs(self, trajs: Sequence[Trajectory]) -> list[torch.Tensor]:
        """The current policy's log-prob of every response token, per trajectory (CPU),
        in eval mode (no dropout noise in logp_old or the drift). Every rank scores its
        share and every rank returns the whole list."""
        self.model.eval()
        out: dict[int, torch.Tensor] = {}
        for group in self._plan(trajs):
            if group is None:  # a padding pass, to match the other ranks' passes
                self._forward(trajs[:1])
                continue
            logp = self._forward([trajs[i] for i in group]).logp
            for row, i in enumerate(group):
                out[i] = logp[row, : len(trajs[i].response_token_ids)].cpu()
        self._reshard()
        if self.world_size > 1:
            import torch.distributed as dist

            shares: list = [None] * self.world_size
            dist.all_gather_object(shares, out)
            out = {i: lp for share in shares for i, lp in share.items()}
        return [out[i] for i in range(len(trajs))]

    # ------------------------------------------------------------------ the update
    def step(self, trajs: Sequence[Trajectory], adv: Sequence[float]) -> StepStats:
        """One batch: mini-batch optimizer steps over micro-batches; returns stats.
        With several ranks every rank calls it with the same batch and gets the same
        stats; each rank computes its share of every mini-batch."""
        if len(trajs) != len(adv) or not trajs:
            raise ValueError(f"need one advantage per trajectory, got {len(trajs)} and {len(adv)}")
        t0 = time.perf_counter()
        probe = self._probe(trajs)
        bonus = self.entropy_coef > 0  # the passes also give each position's entropy
        weights: list[torch.Tensor] | None = None
        is_stats: tuple[float | None, float | None] = (None, None)
        if self.logp_old_mode in ("recompute", "decoupled"):
            full = self.token_logprobs(trajs)
            old, before = full, [full[i] for i in probe]
            if self.logp_old_mode == "decoupled":
                weights, is_stats = self._importance_weights(trajs, full)
        else:
            old = [torch.tensor(t.logprobs, dtype=torch.float64) for t in trajs]  # exact floats
            before = self.token_logprobs([trajs[i] for i in probe])
        k = min(self.mini_batches, len(trajs))
        bounds = [round(j * len(trajs) / k) for j in range(k + 1)]
        totals = {"loss": 0.0, "pg_loss": 0.0, "clip": 0.0, "kl": 0.0, "entropy": 0.0}
        norms = 0.0
        n_tokens = 0
        self.model.train()
        self._positions = [0, 0]
        for j in range(k):
            idx = list(range(bounds[j], bounds[j + 1]))
            mini = [trajs[i] for i in idx]
            normalizer = float(sum(sum(t.loss_mask) for t in mini))  # over every rank's share
            if normalizer == 0:
                continue
            self.opt.zero_grad(set_to_none=True)
            for group in self._plan(mini):
                if group is None:  # a padding pass: matches the other ranks, adds nothing
                    logp = self._forward(mini[:1], bonus).logp
                    self._positions[1] -= len(mini[0].token_ids)  # all of it padding
                    (logp.sum() * 0.0).backward()
                    continue
                sub = [mini[g] for g in group]
                logp, mask, ent = self._forward(sub, bonus)  # [b, R]
                lo = torch.zeros_like(logp)
                for row, g in enumerate(group):
                    o = old[idx[g]]
                    lo[row, : len(o)] = o.to(lo.device)
                w = None
                if weights is not None:
                    w = torch.zeros_like(logp)
                    for row, g in enumerate(group):
                        wg = weights[idx[g]]
                        w[row, : len(wg)] = wg.to(w.device)
                a = torch.tensor([float(adv[idx[g]]) for g in group], device=logp.device)
                loss, st = ppo_clip_loss(
                    logp, lo, a, mask, normalizer, is_weight=w, entropy=ent,
                    entropy_coef=self.entropy_coef, **self.loss_kwargs,
                )  # fmt: skip
                loss.backward()
                totals["loss"] += float(loss.detach())
                totals["pg_loss"] += st.pg_loss
                totals["clip"] += st.clip_frac * st.n_tokens
                totals["kl"] += st.approx_kl * st.n_tokens
                totals["entropy"] += (st.entropy or 0.0) * st.n_tokens
            norms += self._clip_grad()
            self.opt.step()
            n_tokens += int(normalizer)
        self.opt.zero_grad(set_to_none=True)
        self.version += 1
        counted = [float(n) for n in self._positions]
        after = self.token_logprobs([trajs[i] for i in probe])
        masks = [torch.tensor(trajs[i].loss_mask, dtype=torch.bool) for i in probe]
        diff = torch.cat([(a - b).abs()[m] for a, b, m in zip(after, before, masks, strict=True)])
        loss_sum, pg_sum, clip_sum, kl_sum, ent_sum, positions, real = self._all_sum(
            [*totals.values(), *counted]
        )
        return StepStats(
            loss=loss_sum / k,
            pg_loss=pg_sum / k,
            clip_frac=clip_sum / max(1, n_tokens),
            approx_kl=kl_sum / max(1, n_tokens),
            grad_norm=norms / k,
            drift=float(diff.mean()) if diff.numel() else 0.0,
            n_tokens=n_tokens,
            pad_frac=1.0 - real / positions if positions else 0.0,
            n_trajectories=len(trajs),
            optimizer_steps=k,
            step_s=time.perf_counter() - t0,
            is_weight=is_stats[0],
            tis_frac=is_stats[1],
            entropy=ent_sum / max(1, n_tokens) if bonus else None,
        )

    def _importance_weights(
        self, trajs: Sequence[Trajectory], prox: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], tuple[float | None, float | None]]:
        """Each trajectory's per-token weight pi_prox / pi_behaviour (capped at tis_cap),
        and the batch's mean weight and truncated share over trainable tokens. Every rank
        holds the whole batch's log-probs, so every rank computes the same."""
        weights, kept, cut = [], [], []
        for t, lp in zip(trajs, prox, strict=True):
            behaviour = torch.tensor(t.logprobs, dtype=torch.float64)
            w, truncated = importance_weights(
                lp, behaviour, self.tis_cap, self.loss_kwargs["log_ratio_clamp"]
            )
            weights.append(w)
            m = torch.tensor(t.loss_mask, dtype=torch.bool)[: len(w)]
            kept.append(w[m])
            cut.append(truncated[m])
        w_all, cut_all = torch.cat(kept), torch.cat(cut)
        if not w_all.numel():
            return weights, (None, None)
        frac = float(cut_all.double().mean()) if self.tis_cap is not None else None
        return weights, (float(w_all.mean()), frac)

    def _clip_grad(self) -> float:
        """Clip the gradient's global norm to grad_clip; the norm before clipping (over
        every rank's shard)."""
        norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.grad_clip)
        full = getattr(norm, "full_tensor", None)  # a sharded norm: reduce it
        return float(full() if full is not None else norm)

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

    def _reshard(self) -> None:
        """Free the gathered weights a no-grad pass leaves behind (FSDP keeps the root's
        gathered after a forward, for a backward that a no-grad pass never runs)."""
        if self._sharded:
            from agent_spo.dist.fsdp import reshard

            reshard(self._scorer)

    def close(self) -> None:
        """Nothing to stop in one process (a LearnerGroup stops its other ranks)."""

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, path, tokenizer=None) -> None:
        """Write the weights and the optimizer state under ``path/state`` with
        torch.distributed.checkpoint (every rank writes its own shards; any world size can
        read them back) and, from rank 0, ``path/model``: the config and tokenizer, plus the
        full weights in Hugging Face form when the learner is one process."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        path = Path(path)
        self._reshard()
        state: dict[str, Any] = {
            "model": self._model_state(get_model_state_dict),
            "optim": get_optimizer_state_dict(self.model, self.opt),
        }
        with warnings.catch_warnings():  # one process: "assuming a single process" is right
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(path / "state"), no_dist=not self._sharded)
        if self.rank == 0:
            missing = [r for r in range(self.world_size)
                       if not any((path / "state").glob(f"__{r}_*.distcp"))]  # fmt: skip
            if missing:
                raise RuntimeError(
                    f"checkpoint {path}: the shards of learner rank(s) {missing} are not "
                    "there; on several machines run.output_dir must be a file system "
                    "every node sees"
                )
            model_dir = path / "model"
            if self.lora:  # the base model is the run's; its configs and tokenizer only
                self.model.config.save_pretrained(str(model_dir))
                if getattr(self.model, "generation_config", None) is not None:
                    self.model.generation_config.save_pretrained(str(model_dir))
                # the adapter in peft's form beside the shards (its weights when one
                # process holds them whole; `export` writes them from any checkpoint)
                lora.save_adapter(
                    path / "adapter",
                    None if self._sharded else self.named_weights(adapter_only=True),
                    self.model._agent_spo_lora, lora.base_model_of(self.model),
                )  # fmt: skip
            elif self._sharded:
                self.model.config.save_pretrained(str(model_dir))
                if getattr(self.model, "generation_config", None) is not None:
                    self.model.generation_config.save_pretrained(str(model_dir))
            else:
                self.model.save_pretrained(str(model_dir))
            if self.model_dtype is not None:  # the dtype export writes (the learner's is fp32)
                config = json.loads((model_dir / "config.json").read_text())
                config["dtype"] = self.model_dtype
                (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(model_dir))

    def load_state(self, path) -> None:
        """Read what :meth:`save_state` wrote (at any world size) into the weights and the
        optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        self._reshard()
        state: dict[str, Any] = {
            "model": self._model_state(get_model_state_dict),
            "optim": get_optimizer_state_dict(self.model, self.opt),
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            self._check_holds(Path(path) / "state", state["model"])
            dcp.load(state, checkpoint_id=str(Path(path) / "state"), no_dist=not self._sharded)
        # with LoRA the state holds every adapter weight (dcp.load checked) and no frozen one
        set_model_state_dict(
            self.model, state["model"], options=StateDictOptions(strict=not self.lora)
        )
        set_optimizer_state_dict(self.model, self.opt, state["optim"])

    def _check_holds(self, state_dir: Path, model_state: dict[str, Any]) -> None:
        """Refuse shards that lack this learner's weights, naming the likely cause: full
        fine-tuning's checkpoint into a LoRA learner, or back, or another LoRA shape."""
        import torch.distributed.checkpoint as dcp

        saved = dcp.FileSystemReader(str(state_dir)).read_metadata().state_dict_metadata
        missing = [k for k in model_state if f"model.{k}" not in saved]
        if missing:
            rank = self.model._agent_spo_lora.r if self.lora else 0
            raise ValueError(
                f"{state_dir.parent} does not hold this learner's weights ({len(missing)} "
                f"missing, e.g. {missing[0]}; learner.lora.rank is {rank} here): resume "
                "with the learner.lora settings the run was started with"
            )

    def _model_state(self, get_model_state_dict) -> dict[str, Any]:
        """The model's state dict; with LoRA the adapter's weights only (the base weights
        are the run's base model, loaded at the start; a tied embedding is frozen too)."""
        state = get_model_state_dict(self.model)
        return {k: v for k, v in state.items() if lora.is_adapter(k)} if self.lora else state

    def named_weights(self, adapter_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Detached full weights to push into an engine, one tensor at a time (tied copies
        listed once). Sharded weights are gathered from every rank: every rank must
        iterate to the end. With LoRA: the merged weights under the base model's names,
        or with ``adapter_only`` the adapter alone under peft's names (see
        :mod:`agent_spo.lora`)."""
        if adapter_only and not self.lora:
            raise ValueError("adapter_only: this learner trains no adapter")
        self._reshard()
        named = [*self.model.named_parameters(), *_persistent_buffers(self.model)]
        if adapter_only:
            named = [(lora.adapter_name(n), p) for n, p in named if lora.is_adapter(n)]
        gathered = (
            (name, p.detach() if getattr(p, "full_tensor", None) is None
             # wait for the gather now: a pending one outlives its buffers (crashes)
             else _waited(p.full_tensor().detach()))
            for name, p in named
        )  # fmt: skip
        if self.lora and not adapter_only:
            yield from lora.merged_weights(gathered, self._scaling)
        else:
            yield from gathered


class _Scorer(torch.nn.Module):
    """The policy as one module whose forward returns response-token log-probs.

    Everything a log-prob pass touches (the shared-opening pass, the body, the chunked
    head) runs inside this one forward, so a sharded root (FSDP) gathers the embedding,
    the final norm and the LM head once for the whole pass and again for its backward.
    """

    def __init__(self, model, *, lean: bool, chunk: int) -> None:
        super().__init__()
        self.model = model
        self.lean = lean  # head over response rows only, chunk rows at a time
        self.chunk = chunk

    def forward(
        self, ids, att, index, target, flat, head_ids=None, position_ids=None, entropy=False
    ) -> torch.Tensor:
        """Log-probs [B, R] of ``target`` at logits rows ``index`` (zeros past each row's
        response); ``flat`` lists the real (row, position) pairs as ``row * R + i``;
        ``head_ids`` [1, S] is an opening shared by every row (run once) or None.
        Packed: ``ids`` is one row [1, T] holding every sequence end to end,
        ``position_ids`` restart at each, and ``index`` points into that row. With
        ``entropy``: [2, B, R], the log-probs and each position's entropy over the
        vocabulary."""
        n = ids.shape[1]
        b, r = index.shape
        parts = split_head(self.model) if self.lean else None
        kwargs: dict = {"use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if head_ids is not None:
            prefix_model = parts[0] if parts is not None else self.model
            cache = prefix_model(input_ids=head_ids, use_cache=True).past_key_values
            cache.batch_repeat_interleave(b)
            shared = head_ids.shape[1]
            pos = torch.arange(shared, shared + n, device=ids.device)
            kwargs = {"past_key_values": cache, "position_ids": pos[None].expand(b, n),
                      "use_cache": True}  # fmt: skip
        if parts is not None:
            body, lm_head = parts
            hidden = body(input_ids=ids, attention_mask=att, **kwargs).last_hidden_state
            hidden = hidden.expand(b, -1, -1)  # packed: every row reads the one sequence
            rows = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            picked = chunked_logprobs(
                rows.reshape(-1, rows.shape[-1]).index_select(0, flat), lm_head,
                target.reshape(-1).index_select(0, flat), self.chunk, entropy=entropy,
            ).reshape(-1, flat.numel())  # fmt: skip
            k = picked.shape[0]  # 2 with the entropy, else 1
            out = torch.zeros(k, b * r, dtype=picked.dtype, device=ids.device)
            out = out.index_copy(1, flat, picked).view(k, b, r)
            # a fresh tensor, not a view: a sharded root hooks its backward on the output
            return (out if entropy else out[0]).clone()
        logits = self.model(input_ids=ids, attention_mask=att, **kwargs).logits  # [B, n, V]
        logits = logits.expand(b, -1, -1)  # packed: every row reads the one sequence
        rows = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16 -> fp32
        logp = torch.log_softmax(rows, dim=-1).gather(2, target[..., None]).squeeze(2)
        if entropy:
            return torch.stack([logp, token_entropy(rows)])
        return logp.clone()


def _persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers a state dict holds (not the non-persistent ones, e.g. rotary tables)."""
    keys = set(model.state_dict().keys())
    return [(n, b) for n, b in model.named_buffers() if n in keys]


def _waited(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a collective's result (which may still be in flight)."""
    wait = getattr(t, "wait", None)  # an AsyncCollectiveTensor
    return wait() if callable(wait) else t
