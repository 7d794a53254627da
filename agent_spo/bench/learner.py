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

With ``--world-sizes 1,2`` it measures the learner at scale instead
(:func:`run_scale_bench`): a ~24M-parameter Qwen3-shaped model (random weights, the
run's vocabulary) trained on the same batches by the plain loop, the one-process learner
and a learner of N gloo ranks; tokens/s and each process's peak memory.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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


SCALE_SHAPE = {"hidden": 512, "layers": 6, "heads": 8}  # ~24M parameters with Qwen3's layout


LORA_RANK = 16  # the LoRA row's adapter rank (all linear layers)


def scale_learner(*, rank: int, world_size: int, vocab: int, pad: int, lr: float,
                  threads: int, micro_batch_tokens: int, pack: bool = False,
                  lora_rank: int = 0):  # fmt: skip
    """The benchmark's learner on one rank (every rank builds the same random weights);
    ``lora_rank`` > 0 trains adapters of that rank on every linear layer instead."""
    import torch
    from transformers import Qwen3ForCausalLM

    from agent_spo.demo.model import tiny_qwen3_config
    from agent_spo.learner import Learner

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab, pad_token_id=pad, **SCALE_SHAPE))
    if lora_rank:
        from agent_spo import lora
        from agent_spo.config import LoraConfig

        lora.inject(model, LoraConfig(rank=lora_rank))
    return Learner(model, lr=lr, pad_token_id=pad, micro_batch_tokens=micro_batch_tokens,
                   probe_tokens=64, rank=rank, world_size=world_size, pack=pack)  # fmt: skip


def _peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _scale_setting(
    kind: str, world: int, episodes: str, model_path: str, batches: int, lr: float,
    micro_batch_tokens: int,
) -> dict:  # fmt: skip
    """One setting of :func:`run_scale_bench`, in a fresh process (its peak memory is its
    own): "plain", "learner", "packed" or "lora" at world size 1, "learner" at more
    ranks. ``sync_mib`` is what a weight sync sends: the full weights, or LoRA's adapter."""
    import os

    from transformers import AutoTokenizer

    data = logged_batches(Path(episodes), batches + 1)
    tok = AutoTokenizer.from_pretrained(model_path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
    cores = len(os.sched_getaffinity(0))
    kw: dict[str, Any] = {"vocab": len(tok), "pad": pad, "lr": lr,
                          "micro_batch_tokens": micro_batch_tokens}  # fmt: skip
    group, params = None, None
    if world > 1:
        from agent_spo.dist.driver import LearnerGroup, RankSpec

        spec = RankSpec("agent_spo.bench.learner:scale_learner",
                        {**kw, "threads": max(1, cores // world)}, world_size=world)  # fmt: skip
        group = LearnerGroup.start(spec)
        step, pids = group.step, [str(p.pid) for p in group.group.children.values()]
    else:
        learner = scale_learner(rank=0, world_size=1, threads=cores, pack=kind == "packed",
                                lora_rank=LORA_RANK if kind == "lora" else 0, **kw)  # fmt: skip
        step, pids = learner.step, list[str]()
        params = sum(p.numel() for p in learner.model.parameters())
        if kind == "plain":
            step = PlainLoop(learner.model, lr=lr, pad=pad).step
    try:
        times, losses, out = [], [], None
        for i, (trajs, adv) in enumerate(data):
            t0 = time.perf_counter()
            out = step(trajs, adv)
            if i:  # the first batch warms up
                times.append(time.perf_counter() - t0)
            losses.append(getattr(out, "loss", None))
        peaks = [_peak_rss_mb(p) for p in ("self", *pids)]
        source = group if group is not None else learner
        sync = sum(t.numel() * t.element_size()
                   for _, t in source.named_weights(adapter_only=source.lora))  # fmt: skip
        trainable = source.summary()["trainable_params"]
    finally:
        if group is not None:
            group.close()
    tokens = statistics.median(sum(len(t.token_ids) for t in trajs) for trajs, _ in data[1:])
    per_step = statistics.median(times)
    return {
        "world_size": world, "step_s_median": round(per_step, 4),
        "tokens_per_s": round(tokens / per_step, 1),
        "peak_rss_mib": [round(m, 1) for m in peaks],
        "first_loss": losses[0], "pad_frac": getattr(out, "pad_frac", None),
        "tokens_per_batch": tokens,
        "trajectories_per_batch": statistics.median(len(t) for t, _ in data[1:]),
        "batches": len(data) - 1, "cores": cores, "parameters": params,
        "trainable": trainable, "sync_mib": round(sync / 2**20, 2),
    }  # fmt: skip


def run_scale_bench(
    episodes: Path,
    *,
    model_path: str,
    world_sizes: Sequence[int] = (1, 2),
    batches: int = 6,
    lr: float = 3e-4,
    micro_batch_tokens: int = 4096,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Tokens/s and peak memory of a training step on the logged batches: the plain loop,
    the learner (probe of 64 tokens) padded, packed and with LoRA adapters in one process,
    and the learner at
    each larger world size (gloo ranks splitting this machine's cores), all from the same
    random ~24M-parameter weights. Each setting runs in a fresh process, one after the
    other, so each peak is its own; the first batch of each warms up."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import torch

    settings = [("plain PyTorch loop", "plain", 1)]
    if 1 in world_sizes:
        settings += [("learner, 1 process", "learner", 1),
                     ("learner, 1 process, packed", "packed", 1),
                     (f"learner, 1 process, LoRA rank {LORA_RANK}", "lora", 1)]  # fmt: skip
    settings += [(f"learner, {w} gloo ranks", "learner", w) for w in world_sizes if w > 1]
    rows = []
    for done, (name, kind, world) in enumerate(settings):
        if progress is not None:
            progress(name, done, len(settings))
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            row = pool.submit(_scale_setting, kind, world, str(episodes), model_path,
                              batches, lr, micro_batch_tokens).result()  # fmt: skip
        rows.append({"setting": name, **row})
    if progress is not None:
        progress("done", len(settings), len(settings))
    first = rows[0]
    return {
        "episodes": str(episodes),
        "parameters": first["parameters"],
        "batches": first["batches"],
        "tokens_per_batch": first["tokens_per_batch"],
        "trajectories_per_batch": first["trajectories_per_batch"],
        "cores": first["cores"],
        "torch": torch.__version__,
        "rows": rows,
    }


__all__ = ["logged_batches", "run_learner_bench", "run_scale_bench", "scale_learner"]
