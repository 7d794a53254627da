"""The learner benchmark: what measuring the drift on a probe saves, and what it measures.

The learner's step runs, besides the update, two no-grad log-prob passes for the drift
d_s that the ``kl_version`` discount sums: before and after the update, over the whole
batch. ``algo.rho.probe_tokens`` runs them on a probe instead (whole trajectories up to
that many trainable tokens). This replays the batches a training run logged
(``episodes.jsonl``: its trajectories and the advantages it trained them with) through
one learner per setting, side by side and interleaved batch by batch, all from the same
initial weights: the updates are identical (the probe changes only the measurement), so
each step's d_s can be compared with the whole batch's at the same weights. A plain
PyTorch loop (:class:`PlainLoop`) runs on the same batches beside them, as the
reference for the step's speed.

    agent-spo bench learner --episodes RUN/episodes.jsonl [--probes 64,128,256]
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def logged_batches(path: Path, limit: int) -> list[tuple[list, list[float]]]:
    """The first ``limit`` training steps of an episode log: (trajectories, advantages)."""
    from agent_spo.episode.trajectory import Trajectory

    steps: dict[int, tuple[list, list[float]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            step = rec.get("train", {}).get("step")
            if step is None or rec["train"].get("adv") is None:
                continue
            if step not in steps and len(steps) == limit:
                break
            trajs, adv = steps.setdefault(step, ([], []))
            train = rec.pop("train")
            trajs.append(Trajectory.from_json(json.dumps(rec)))
            adv.append(float(train["adv"]))
    if not steps:
        raise ValueError(f"{path}: no trained trajectories (a train run's episodes.jsonl)")
    return [steps[k] for k in sorted(steps)]


class PlainLoop:
    """The reference a learner step is held against: one padded forward over the whole
    batch, the advantage-weighted log-likelihood of the trainable tokens, backward,
    gradient clipping and AdamW: no micro-batches, no PPO ratio, no drift passes."""

    def __init__(self, model, *, lr: float, pad: int) -> None:
        import torch

        self.model, self.pad = model.train(), pad
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def step(self, trajs, adv) -> None:
        import torch

        n = max(len(t.token_ids) for t in trajs)
        ids = torch.full((len(trajs), n), self.pad, dtype=torch.long)
        att = torch.zeros((len(trajs), n), dtype=torch.long)
        weight = torch.zeros((len(trajs), n - 1))
        for b, (t, a) in enumerate(zip(trajs, adv, strict=True)):
            ids[b, : len(t.token_ids)] = torch.tensor(t.token_ids)
            att[b, : len(t.token_ids)] = 1
            p = len(t.prompt_token_ids)
            weight[b, p - 1 : p - 1 + len(t.loss_mask)] = a * torch.tensor(t.loss_mask)
        logits = self.model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
        loss = -(logp * weight).sum() / max(1.0, float((weight != 0).sum()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run_learner_bench(
    episodes: Path,
    *,
    model_path: str,
    probes: Sequence[int | None] = (None, 64, 128, 256),
    batches: int = 8,
    lr: float = 3e-4,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Step time and d_s per probe setting over the logged batches (first one a warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_spo.learner import Learner

    data = logged_batches(episodes, batches + 1)
    tok = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    learners = {
        p: Learner(copy.deepcopy(base), lr=lr, pad_token_id=pad or 0, probe_tokens=p)
        for p in probes
    }
    plain = PlainLoop(copy.deepcopy(base), lr=lr, pad=pad or 0)
    times: dict[int | None, list[float]] = {p: [] for p in probes}
    drift: dict[int | None, list[float]] = {p: [] for p in probes}
    plain_s: list[float] = []
    for i, (trajs, adv) in enumerate(data):
        order: list = [*probes, "plain"]
        if i % 2:
            order.reverse()  # no position bias
        for p in order:
            t0 = time.perf_counter()
            if p == "plain":
                plain.step(trajs, adv)
                if i:
                    plain_s.append(time.perf_counter() - t0)
                continue
            stats = learners[p].step(trajs, adv)
            if i:  # the first batch warms up
                times[p].append(time.perf_counter() - t0)
                drift[p].append(stats.drift)
        if progress is not None:
            progress(i + 1, len(data))
    full = probes[0]
    rows = []
    for p in probes:
        step_s = statistics.median(times[p])
        rel = [abs(d - f) / f for d, f in zip(drift[p], drift[full], strict=True) if f > 0]
        rows.append({
            "probe_tokens": p,
            "step_s_median": round(step_s, 4),
            "vs_full": round(step_s / statistics.median(times[full]), 3),
            "drift_mean": statistics.fmean(drift[p]),
            "drift_rel_error_median": round(statistics.median(rel), 4) if rel else None,
            "drift_rel_error_max": round(max(rel), 4) if rel else None,
        })  # fmt: skip
    sizes = [len(t) for t, _ in data[1:]]
    tokens = [sum(sum(x.loss_mask) for x in t) for t, _ in data[1:]]
    plain_median = statistics.median(plain_s)
    return {
        "plain_loop_step_s_median": round(plain_median, 4),
        "plain_loop_vs_full": round(plain_median / statistics.median(times[full]), 3),
        "episodes": str(episodes),
        "batches": len(data) - 1,
        "trajectories_per_batch": statistics.median(sizes),
        "trainable_tokens_per_batch": statistics.median(tokens),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


__all__ = ["logged_batches", "run_learner_bench"]
