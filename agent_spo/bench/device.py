"""The GPU device check: the learner and the transformers engine on one real accelerator.

``scripts/device_check.sh`` runs this on a lent GPU machine (its own torch and
transformers, the project's source on PYTHONPATH, no vLLM there) and writes one JSON
report. It measures, on a Qwen3-1.7B-shaped model with random weights and the full
151,936-token vocabulary:

* **learner step**, one process and FSDP2 on a one-rank group: bf16 autocast over float32 master weights, gradient checkpointing,
  chunked log-probs, sequences of ``seq_tokens`` tokens: trainable tokens/s, peak GPU
  memory, the time of one no-grad log-prob pass (the step runs two, for the drift), and
  model-FLOPs utilisation of the update: (6 × parameters + 6 × layers × width × length)
  FLOPs per forwarded token (weights, and causal attention) over the step's time less
  its two log-prob passes, against the chip's dense bf16 peak;
* **chunked vs full log-probs** under bf16 autocast: the largest log-prob difference and
  the relative difference of the gradients, so a silent fall-back or a precision loss in
  the chunked path shows;
* **log-prob agreement**: the same tokens scored under bf16 autocast and in float32
  (random weights: logits spread little, so real models disagree more);
* **engine**: the transformers engine generating for many concurrent requests in bf16
  (tokens/s), and the time to push the learner's weights into it;
* **LoRA**: the learner step with rank-32 adapters on a frozen bf16 base (as one process
  trains LoRA under bf16), then the adapter alone pushed into an engine holding the same
  adapter layers: bytes against a full bf16 sync, seconds, and the engine's log-probs
  against the learner's. Its peak memory also counts the float32 model the other parts
  share, and its MFU counts 6 FLOPs per parameter as the full step does, though the
  frozen base gets no weight gradients (about 4): read its tokens/s, not its MFU.

``--tiny`` runs every part on a model small enough for a CPU, so the suite checks that
the script works end to end; its numbers mean nothing.

    python -m agent_spo.bench.device --out report.json [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import random
import time
from pathlib import Path

import torch

# Dense bf16 peak, FLOP/s (vendor figures, no sparsity), by name and streaming-processor
# count: an H100 SXM has 132 SMs, the PCIe card 114.
PEAK_BF16 = {("H200", 132): 989e12, ("H100", 132): 989e12, ("H100", 114): 756e12,
             ("A100", 108): 312e12}  # fmt: skip


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return next((v for (chip, n), v in PEAK_BF16.items() if chip in name and n == sms), None)


QWEN3_1_7B = {
    "vocab_size": 151936, "hidden": 2048, "intermediate": 6144, "layers": 28, "heads": 16,
    "kv_heads": 8, "head_dim": 128,
}  # fmt: skip
TINY = {"vocab_size": 2048, "hidden": 64, "intermediate": 128, "layers": 2, "heads": 4,
        "kv_heads": 2, "head_dim": 16}  # fmt: skip


def qwen3(shape: dict, device: str, seed: int = 0):
    """A randomly initialised Qwen3 of this shape, float32, built on ``device``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=40960, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3ForCausalLM(cfg).float()


def _trajectories(n: int, tokens: int, vocab: int, seed: int):
    """n trajectories of ``tokens`` tokens: a 1/8 prompt, then one model turn."""
    from agent_spo.episode.trajectory import Segment, Trajectory

    rng = random.Random(seed)
    prompt = max(1, tokens // 8)
    out = []
    for i in range(n):
        resp = tuple(rng.randrange(3, vocab) for _ in range(tokens - prompt))
        ids = tuple(rng.randrange(3, vocab) for _ in range(prompt))
        seg = Segment("model", resp, (-1.0,) * len(resp), 0)
        out.append(Trajectory(f"p{i}", ids, (seg,)))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def fsdp_step(model, device: str, **kw) -> dict:
    """:func:`learner_step` with the model sharded by FSDP2 over a one-rank process group
    (NCCL on the GPU): bf16 gathers, float32 gradient reduction, the learner's sharded
    path. Run last: sharding converts the model's weights in place."""
    import torch.distributed as dist

    from agent_spo.dist.group import RankSpec, connect, free_port, join

    spec = RankSpec("agent_spo.bench.device:unused", {}, world_size=1, port=free_port())
    join(spec, 0, connect(spec, 0))
    try:
        return learner_step(model, device, fsdp=True, **kw)
    finally:
        dist.destroy_process_group()


def learner_step(
    model, device: str, *, seqs: int, seq_tokens: int, steps: int, fsdp: bool = False,
    keep: list | None = None,
) -> dict:  # fmt: skip
    """Timed learner steps (after one warm-up) in bf16 autocast with checkpointing;
    ``keep`` receives the learner."""
    from agent_spo.learner import Learner

    learner = Learner(
        model, lr=1e-6, compute_dtype=torch.bfloat16, gradient_checkpointing=True,
        micro_batch_tokens=seq_tokens, logprob_chunk=1024, logp_old="recompute", fsdp=fsdp,
    )  # fmt: skip
    if keep is not None:
        keep.append(learner)
    trajs = _trajectories(seqs, seq_tokens, model.config.vocab_size, seed=1)
    adv = [1.0 if i % 2 else -1.0 for i in range(seqs)]
    learner.step(trajs, adv)  # warm-up: kernels, allocator
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        stats = learner.step(trajs, adv)
        _sync(device)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    learner.token_logprobs(trajs)
    _sync(device)
    logprob_s = time.perf_counter() - t0
    step_s = sorted(times)[len(times) // 2]
    update_s = max(1e-9, step_s - 2 * logprob_s)  # the step also runs "before" and "after"
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    per_token = 6 * params + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq_tokens
    peak = peak_flops(device)
    return {
        "fsdp": fsdp,
        "params": params,
        "trainable_params": learner.summary()["trainable_params"],
        "lean_logprobs": learner.lean,
        "attention": getattr(cfg, "_attn_implementation", None),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "sequences": seqs,
        "seq_tokens": seq_tokens,
        "trainable_tokens": stats.n_tokens,
        "step_s_median": round(step_s, 3),
        "step_s_all": [round(t, 3) for t in times],
        "logprob_pass_s": round(logprob_s, 3),
        "tokens_per_s": round(stats.n_tokens / step_s, 1),
        "peak_memory_gb": _peak_gb(device),
        "update_mfu": round(per_token * seqs * seq_tokens / update_s / peak, 4) if peak else None,
        "loss": stats.loss,
        "drift": stats.drift,
    }


def chunked_vs_full(model, *, tokens: int) -> dict:
    """Log-probs and gradients of the chunked path against the full logits, bf16 autocast."""
    from agent_spo.learner import Learner

    trajs = _trajectories(2, tokens, model.config.vocab_size, seed=4)
    out: dict = {}
    for name, chunk in (("chunked", 1024), ("full", None)):
        learner = Learner(model, compute_dtype=torch.bfloat16, logprob_chunk=chunk)
        out[f"{name}_lean"] = learner.lean
        model.zero_grad(set_to_none=True)
        logp, mask, _ = learner._forward(trajs)
        (logp * mask).sum().backward()
        out[name] = (logp.detach()[mask.bool()].float().cpu(),
                     torch.cat([p.grad.flatten().float() for p in model.parameters()
                                if p.grad is not None]))  # fmt: skip
    model.zero_grad(set_to_none=True)
    (lp_a, g_a), (lp_b, g_b) = out.pop("chunked"), out.pop("full")
    out["logprob_max_abs"] = float((lp_a - lp_b).abs().max())
    out["grad_rel_diff"] = float((g_a - g_b).norm() / g_b.norm())
    return out


def logprob_agreement(model, *, tokens: int) -> dict:
    """|logp_bf16 − logp_fp32| over one sequence's response tokens."""
    from agent_spo.learner import Learner

    trajs = _trajectories(1, tokens, model.config.vocab_size, seed=2)
    bf16 = Learner(model, compute_dtype=torch.bfloat16).token_logprobs(trajs)[0]
    fp32 = Learner(model, compute_dtype=None).token_logprobs(trajs)[0]
    diff = (bf16 - fp32).abs()
    return {
        "tokens": int(diff.numel()),
        "mean_abs": float(diff.mean()),
        "max_abs": float(diff.max()),
        "p99_abs": float(diff.quantile(0.99)),
        "prob_mean_abs": float((bf16.exp() - fp32.exp()).abs().mean()),
    }


async def _generate(engine, *, requests: int, prompt: int, new: int, vocab: int) -> dict:
    from agent_spo.engines.base import Sampling

    rng = random.Random(3)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt)] for _ in range(requests)]
    sampling = Sampling(max_tokens=new, temperature=1.0, seed=0)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(p, sampling) for p in prompts))
    wall = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in outs)
    return {"requests": requests, "prompt_tokens": prompt, "generated_tokens": generated,
            "wall_s": round(wall, 2), "tokens_per_s": round(generated / wall, 1)}  # fmt: skip


def engine_check(model, device: str, *, requests: int, prompt: int, new: int) -> dict:
    """The transformers engine in bf16 on a copy of the model; then a weight push."""
    from agent_spo.demo.tokenizer import train_tokenizer
    from agent_spo.engines.hf import HFEngine
    from agent_spo.learner import Learner

    tok = train_tokenizer([f"{i} + {i} = {2 * i}" for i in range(200)], vocab_size=300)
    served = copy.deepcopy(model).to(torch.bfloat16)
    engine = HFEngine(served, tok, device=device, max_batch=requests, prefix_cache=False)

    async def run() -> dict:
        try:
            gen = await _generate(engine, requests=requests, prompt=prompt, new=new,
                                  vocab=model.config.vocab_size)  # fmt: skip
            _sync(device)
            t0 = time.perf_counter()
            weights = Learner(model, logprob_chunk=None).named_weights()  # as training
            await engine.update_weights(weights, version=1)
            _sync(device)
            gen["weight_push_s"] = round(time.perf_counter() - t0, 3)
            gen["colocated"] = await _sleep_and_wake(engine, device, model.config.vocab_size)
            gen["stats"] = dict(engine.stats)
            return gen
        finally:
            await engine.close()

    return asyncio.run(run())


def lora_check(model, device: str, *, seqs: int, seq_tokens: int, steps: int,
               rank: int = 32) -> dict:  # fmt: skip
    """LoRA (rank ``rank`` on every linear layer) as one process trains it under bf16:
    a bf16 copy of the model as the frozen base, float32 adapters. Timed steps and peak
    memory as :func:`learner_step`; then the adapter alone pushed into a transformers
    engine holding the same adapter layers (bytes, seconds), and the engine's log-probs
    of a greedy generation against the learner's own (the adapter arrived)."""
    from agent_spo import lora
    from agent_spo.config import LoraConfig
    from agent_spo.demo.tokenizer import train_tokenizer
    from agent_spo.engines.base import Sampling
    from agent_spo.engines.hf import HFEngine
    from agent_spo.episode.trajectory import Segment, Trajectory

    settings = LoraConfig(rank=rank)
    base = lora.inject(copy.deepcopy(model).to(torch.bfloat16), settings)
    kept: list = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = learner_step(base, device, seqs=seqs, seq_tokens=seq_tokens, steps=steps, keep=kept)
    learner = kept[0]
    for _ in range(2):  # move the adapter well away from zero, so a missed sync shows
        learner.opt.param_groups[0]["lr"] = 1e-3
        learner.step(_trajectories(2, 64, model.config.vocab_size, seed=7), [1.0, -1.0])
    tok = train_tokenizer([f"{i} + {i} = {2 * i}" for i in range(200)], vocab_size=300)
    served = lora.inject(copy.deepcopy(model).to(torch.bfloat16), settings)
    engine = HFEngine(served, tok, device=device, max_batch=2, prefix_cache=False)
    prompt = [random.Random(3).randrange(10, model.config.vocab_size) for _ in range(32)]

    async def run():
        try:
            _sync(device)
            t0 = time.perf_counter()
            sent = [(n, t) for n, t in learner.named_weights(adapter_only=True)]
            await engine.update_weights(sent, version=learner.version)
            _sync(device)
            push_s = time.perf_counter() - t0
            gen = await engine.generate(prompt, Sampling(max_tokens=16, temperature=0))
            return sent, push_s, gen
        finally:
            await engine.close()

    sent, push_s, gen = asyncio.run(run())
    probe = Trajectory(
        "p", tuple(prompt), (Segment("model", tuple(gen.token_ids), tuple(gen.logprobs), 1),)
    )
    mine = learner.token_logprobs([probe])[0]
    full = sum(p.numel() * 2 for p in model.parameters())  # a bf16 full sync's bytes
    out.update({
        "rank": rank,
        "adapter_sync_mib": round(sum(t.numel() * t.element_size() for _, t in sent) / 2**20, 2),
        "full_sync_mib_bf16": round(full / 2**20, 1),
        "adapter_push_s": round(push_s, 3),
        "engine_vs_learner_logprob_max_diff": float((mine - torch.tensor(gen.logprobs)).abs().max()),
        "engine_version": gen.policy_version,
    })  # fmt: skip
    return out


def _allocated_gb(device: str) -> float | None:
    if device != "cuda":
        return None
    _sync(device)
    return round(torch.cuda.memory_allocated() / 2**30, 3)


async def _sleep_and_wake(engine, device: str, vocab: int) -> dict:
    """Colocated training: the GPU memory the engine gives back while it sleeps, and
    that it generates again after it wakes."""
    awake = _allocated_gb(device)
    t0 = time.perf_counter()
    await engine.sleep()
    asleep, sleep_s = _allocated_gb(device), time.perf_counter() - t0
    t0 = time.perf_counter()
    await engine.wake()
    wake_s = time.perf_counter() - t0
    again = await _generate(engine, requests=2, prompt=16, new=4, vocab=vocab)
    return {"allocated_gb_awake": awake, "allocated_gb_asleep": asleep,
            "allocated_gb_woken": _allocated_gb(device), "sleep_s": round(sleep_s, 3),
            "wake_s": round(wake_s, 3), "generates_after_wake": again["generated_tokens"] > 0}  # fmt: skip


def run_device_check(
    *, tiny: bool = False, seq_tokens: int | None = None, out: Path | None = None
) -> dict:
    """Every part of the check; a failing part is reported as its error, not raised. With
    ``out``, the report is rewritten after every part (a run cut short keeps what it did)."""
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "shape": "tiny" if tiny else "qwen3-1.7b",
    }
    seq = seq_tokens or (256 if tiny else 8192)
    t0 = time.perf_counter()
    model = qwen3(TINY if tiny else QWEN3_1_7B, device)
    report["build_s"] = round(time.perf_counter() - t0, 1)
    parts = {
        "learner": lambda: learner_step(model, device, seqs=2, seq_tokens=seq, steps=3),
        "chunked_vs_full": lambda: chunked_vs_full(model, tokens=min(seq, 2048)),
        "logprob_agreement": lambda: logprob_agreement(model, tokens=min(seq, 2048)),
        "engine": lambda: engine_check(model, device, requests=4 if tiny else 64,
                                       prompt=32 if tiny else 512, new=8 if tiny else 256),
        "lora": lambda: lora_check(model, device, seqs=2, seq_tokens=seq, steps=3),
        # last: it shards the model in place
        "fsdp_learner": lambda: fsdp_step(model, device, seqs=2, seq_tokens=seq, steps=3),
    }  # fmt: skip
    for name, part in parts.items():
        t0 = time.perf_counter()
        try:
            report[name] = part()
        except Exception as e:  # noqa: BLE001 - one broken part must not hide the others
            report[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        report[name]["part_s"] = round(time.perf_counter() - t0, 1)
        gc.collect()  # the part's learner and its optimizer state
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({name: report[name]}), flush=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report to write.")
    parser.add_argument("--tiny", action="store_true", help="A CPU-sized model (a smoke test).")
    parser.add_argument("--seq-tokens", type=int, default=None, help="Tokens per sequence.")
    args = parser.parse_args(argv)
    return run_device_check(tiny=args.tiny, seq_tokens=args.seq_tokens, out=args.out)


if __name__ == "__main__":
    main()
