"""A training run: builds the parts from a config, runs the loop, logs, checkpoints, resumes.

The loop itself lives in :mod:`agent_spo.pipeline`; this module owns the run directory:

    RUN_DIR/config.yaml        the resolved config
    RUN_DIR/metrics.jsonl      one line of namespaced metrics per learner step
    RUN_DIR/episodes.jsonl     every trained trajectory, with step, baseline and lag
    RUN_DIR/checkpoints/       atomic checkpoints (agent_spo.checkpoint)
    RUN_DIR/summary.json       final numbers, with held-out accuracy before and after

``resume=True`` continues from the latest checkpoint: model, optimizer, tracker, sampler
RNG and step come back; the metrics and episode logs are cut back to what that
checkpoint had seen, so no batch is counted twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from agent_spo import builders
from agent_spo.checkpoint import latest_checkpoint, restore, save_checkpoint
from agent_spo.config import TrainConfig, write_resolved
from agent_spo.metrics import MetricsLog, read_metrics


class RunExists(RuntimeError):
    """The run directory already holds a run and neither resume nor a new name was given."""


class UnsupportedConfig(ValueError):
    """A config value this trainer does not run yet, or cannot run as given; names the key."""


def _check_supported(cfg: TrainConfig) -> None:
    """Refuse, before any work, settings that would otherwise be ignored or crash later."""
    problems = []
    if cfg.rollout.engine == "openai_http":
        problems.append("rollout.engine=openai_http cannot receive the learner's weights; "
                        "train with hf or vllm")  # fmt: skip
    if cfg.algo.rho.mode == "kl_exact":
        problems.append("algo.rho.mode=kl_exact (per-prompt measured drift) is not built "
                        "into training yet; use kl_version or constant")  # fmt: skip
    for key in ("kl_coef", "entropy_coef"):
        if getattr(cfg.loss, key) != 0:
            problems.append(f"loss.{key}: the learner has no reference/entropy term yet; use 0")
    if problems:
        raise UnsupportedConfig("; ".join(problems))


# Keys a resumed run may change: how long it runs and what it writes, not what it learns.
_RESUMABLE_CHANGES = ("run.output_dir", "train.", "rollout.workers", "sandbox.pool_size")


def _check_resume_config(cfg: TrainConfig, saved: Path) -> None:
    """--resume continues the run the checkpoint belongs to: a changed learning setting
    (lr, algorithm, tracker, data, model, ...) would silently mix two runs, so refuse it."""
    from agent_spo.config import load_config

    if not saved.exists():
        return
    old = _flatten(load_config(saved).model_dump(mode="json"))
    new = _flatten(cfg.model_dump(mode="json"))
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith(_RESUMABLE_CHANGES)
    ]
    if changed:
        raise UnsupportedConfig(
            "--resume with a config that differs from the run's config.yaml in what it "
            f"learns: {'; '.join(changed)}. Resume with the original settings, or start a "
            "new run (run.name=...)"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _truncate_jsonl(path: Path, *, offset: int | None = None, max_step: int | None = None) -> None:
    """Cut a log back to a byte offset, or to the rows with step <= max_step."""
    if not path.exists():
        return
    if offset is not None:
        with open(path, "r+b") as f:
            f.truncate(offset)
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except ValueError:  # a torn last line from a crash
            continue
    path.write_text("".join(x + "\n" for x in keep))


async def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_metrics: Callable[[dict], None] | None = None,
    on_estimate: Callable | None = None,
) -> dict:
    """Train as the config says; returns the summary (also written to summary.json)."""
    from transformers.utils import logging as hf_logging

    _check_supported(cfg)
    hf_logging.disable_progress_bar()  # weight loads and shard writes would flood the log
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt_root = run_dir / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if resume and ckpt is None:
        log(f"no checkpoint under {ckpt_root}; starting from scratch")
    if not resume and any((run_dir / f).exists() for f in ("metrics.jsonl", "values.jsonl")):
        raise RunExists(
            f"{run_dir} already holds a run; pass --resume to continue it, or set run.name"
        )
    train, held_out = builders.build_datasets(cfg.data, cfg.run.seed)
    problems = {p.key: p for p in train}
    in_flight = cfg.rollout.workers // (cfg.algo.grpo.group_size if cfg.algo.name == "grpo" else 1)
    if in_flight > len(problems):
        raise UnsupportedConfig(
            f"rollout.workers keeps {in_flight} prompts in flight but there are only "
            f"{len(problems)} training prompts; lower rollout.workers"
        )
    if cfg.algo.init.values_path is not None and cfg.algo.name == "spo" and ckpt is None:
        from agent_spo.values import load_values

        load_values(cfg.algo.init.values_path, known=problems)  # a bad file fails before work
    if resume:
        _check_resume_config(cfg, run_dir / "config.yaml")
    write_resolved(cfg, run_dir)
    base_path = builders.resolve_model_path(cfg.model, log=log)
    model_path = str(ckpt.model_dir) if ckpt else base_path

    threads_before = apply_torch_threads(cfg)
    try:
        engine = builders.build_engine(model_path, cfg.model, cfg.rollout, cfg.run.seed)
        try:
            return await _train(cfg, engine, model_path, ckpt, run_dir, ckpt_root, problems,
                                held_out, log, on_metrics, on_estimate)  # fmt: skip
        finally:
            await engine.close()
    finally:
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)


def torch_threads_for(cfg: TrainConfig) -> int | None:
    """train.torch_threads, or auto: half the cores when the in-process engine and the
    learner share the CPU; None = leave torch's default."""
    import os

    import torch

    if cfg.train.torch_threads is not None:
        return cfg.train.torch_threads
    if cfg.rollout.engine != "hf" or torch.cuda.is_available():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 2) // 2)


def apply_torch_threads(cfg: TrainConfig) -> int | None:
    """Apply torch_threads_for(cfg); the previous count (to restore), or None if unchanged."""
    import torch

    n = torch_threads_for(cfg)
    if n is None:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


async def _train(cfg, engine, model_path, ckpt, run_dir, ckpt_root, problems, held_out, log,
                 on_metrics, on_estimate) -> dict:  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_spo.episode.runner import EpisodeRunner
    from agent_spo.learner import Learner
    from agent_spo.pipeline import StreamSettings, train_grpo, train_spo

    tokenizer = getattr(engine, "tokenizer", None) or AutoTokenizer.from_pretrained(model_path)
    # The learner keeps float32 weights (AdamW on bf16 weights loses small updates); the
    # engine samples in model.dtype.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    L = cfg.learner
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    learner = Learner(
        model, lr=L.lr, betas=L.betas, weight_decay=L.weight_decay, grad_clip=L.grad_clip,
        mini_batches=L.mini_batches, micro_batch_tokens=L.micro_batch_tokens,
        eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high,
        dual_clip_c=cfg.loss.dual_clip_c, pad_token_id=pad or 0,
        logp_old=cfg.loss.logp_old, log_ratio_clamp=cfg.loss.log_ratio_clamp,
        compute_dtype=_compute_dtype(L.precision, device),
        gradient_checkpointing=L.gradient_checkpointing == "on"
        or (L.gradient_checkpointing == "auto" and device == "cuda"),
    )  # fmt: skip
    metrics_path, episodes_path = run_dir / "metrics.jsonl", run_dir / "episodes.jsonl"
    first_step = ckpt.step if ckpt is not None else 0
    if ckpt is not None:
        _truncate_jsonl(episodes_path, offset=ckpt.state["episode_log_offset"])
        _truncate_jsonl(metrics_path, max_step=first_step)
    else:
        for p in (metrics_path, episodes_path):
            p.unlink(missing_ok=True)

    toolbox = builders.build_toolbox(cfg.rollout)
    renderer = builders.build_renderer(tokenizer, cfg.rollout, toolbox)
    settings = builders.build_episode_settings(cfg.rollout, cfg.sandbox)
    stream = StreamSettings(
        batch_size=L.batch_size, batch_tokens=L.batch_tokens, total_steps=cfg.train.total_steps,
        workers=cfg.rollout.workers, max_staleness=L.max_staleness,
        baseline=cfg.algo.baseline, seed=cfg.run.seed + first_step, first_step=first_step,
        adv_eps=cfg.algo.adv_eps, grpo_std_eps=cfg.algo.grpo.std_eps,
    )  # fmt: skip
    summary: dict = {"run_dir": str(run_dir), "algo": cfg.algo.name, "resumed_at": first_step}
    with builders.build_verifier(cfg.verifier) as verifier:
        async with builders.build_sandbox(cfg.sandbox) as sandbox:
            runner = EpisodeRunner(engine, renderer, toolbox, sandbox, verifier, settings)
            tracker = builders.build_tracker(cfg.algo)
            if ckpt is not None:
                sampler = builders.build_sampler(cfg.algo, list(problems), tracker, cfg.run.seed)
                restore(ckpt, optimizer=learner.opt, tracker=tracker, sampler=sampler)
                sampler.release_all()  # episodes in flight at the checkpoint are gone
                learner.version = ckpt.state["learner_version"]
                await engine.update_weights(learner.named_weights(), learner.version)
                log(f"resumed from {ckpt.path.name} (step {first_step})")
            else:
                if cfg.algo.name == "spo" and cfg.algo.init.mode != "none":
                    summary["values"] = await _init_values(
                        cfg, runner, problems, tracker, run_dir, log, on_estimate
                    )
                sampler = builders.build_sampler(cfg.algo, list(problems), tracker, cfg.run.seed)
            T = cfg.train
            eval_settings = dataclasses.replace(
                settings, temperature=T.eval_temperature, top_p=T.eval_top_p, top_k=T.eval_top_k
            )
            eval_runner = EpisodeRunner(engine, renderer, toolbox, sandbox, verifier, eval_settings)
            evaluator = _Evaluator(cfg, eval_runner, held_out, run_dir)
            if held_out and cfg.train.eval_every and first_step == 0:
                summary["held_out_before"] = (await evaluator.run(0)).to_dict()
            elif first_step > 0:  # resumed: the step-0 evaluation is in the kept metrics
                before = [r for r in read_metrics(metrics_path)
                          if r.get("step") == 0 and "eval/accuracy" in r]  # fmt: skip
                if before:
                    summary["held_out_before"] = {
                        "accuracy": before[0]["eval/accuracy"],
                        "tool_use_rate": before[0]["eval/tool_use_rate"],
                        "scored": before[0]["eval/episodes"],
                    }
            metrics = MetricsLog(run_dir, tensorboard=cfg.train.tensorboard)
            if evaluator.step == 0:  # evaluated before training in this process
                metrics.write(evaluator.last_row)
            elog = open(episodes_path, "a", encoding="utf-8")
            t_start = time.perf_counter()
            saving = {"s": 0.0}  # checkpoint writing, summed into the summary

            async def on_step(row: dict, batch) -> None:
                step = row["step"]
                for b in batch:
                    rec = json.loads(b.traj.to_json())
                    rec["train"] = {"step": step, "v_hat": b.v_hat, "v_after": b.v_after,
                                    "adv": b.adv, "group": b.group,
                                    "lag": b.traj.staleness(learner.version - 1)}  # fmt: skip
                    elog.write(json.dumps(rec) + "\n")
                elog.flush()
                row["perf/elapsed_s"] = time.perf_counter() - t_start
                every = cfg.train.eval_every
                if held_out and ((every and step % every == 0) or step == cfg.train.total_steps):
                    await evaluator.run(step)
                    row.update(evaluator.last_row)
                if (
                    step % cfg.train.log_every == 0
                    or step == cfg.train.total_steps
                    or ("eval/accuracy" in row)
                ):
                    metrics.write(row)
                if on_metrics is not None:
                    on_metrics(row)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.total_steps:
                    # Tracker and sampler are copied now: workers keep updating them while
                    # the files are written. The weights and optimizer hold still, since the
                    # learner waits for this step's callback, so the disk work runs in a
                    # thread and episodes keep flowing meanwhile.
                    t_save = time.perf_counter()
                    await asyncio.to_thread(
                        save_checkpoint, ckpt_root, step=step, model=learner.model,
                        tokenizer=tokenizer, optimizer=learner.opt,
                        tracker=tracker.state_dict(), sampler=sampler.state_dict(),
                        learner_version=learner.version, episode_log_offset=elog.tell(),
                    )  # fmt: skip
                    saving["s"] += time.perf_counter() - t_save

            try:
                if cfg.algo.name == "grpo":
                    await train_grpo(
                        runner=runner, problems=problems, sampler=sampler, learner=learner,
                        engine=engine, settings=stream, group_size=cfg.algo.grpo.group_size,
                        on_step=on_step,
                    )  # fmt: skip
                else:
                    await train_spo(
                        runner=runner, problems=problems, tracker=tracker, sampler=sampler,
                        learner=learner, engine=engine, settings=stream, on_step=on_step,
                    )  # fmt: skip
                summary["train_s"] = round(time.perf_counter() - t_start, 1)
                summary["checkpoint_s"] = round(saving["s"], 1)
                if held_out:
                    final = cfg.train.total_steps
                    if evaluator.step != final:
                        await evaluator.run(final)
                        metrics.write(evaluator.last_row)
                    summary["held_out"] = evaluator.summary.to_dict()
            finally:
                metrics.close()
                elog.close()
    summary["steps"] = cfg.train.total_steps
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.train.plot:
        from agent_spo.plot import plot_run

        try:
            summary["plot"] = str(plot_run(run_dir))
        except Exception as e:  # a plot must never cost the run its summary
            log(f"warning: could not draw the curves: {e}")
    return summary


def _compute_dtype(precision: str, device: str):
    import torch

    if precision == "bfloat16" or (precision == "auto" and device == "cuda"):
        return torch.bfloat16
    return None


async def _init_values(cfg, runner, problems, tracker, run_dir, log, on_estimate) -> dict:
    """The tracker's offline prior: from algo.init.values_path, or estimated now (resumable)."""
    from agent_spo.values import estimate_values, load_values, value_summary

    init = cfg.algo.init
    if init.values_path is not None:
        values = load_values(init.values_path, known=problems)
        source = init.values_path
    else:
        path = run_dir / "values.jsonl"
        log(f"estimating initial values: {init.n0} episodes x {len(problems)} prompts "
            f"-> {path} (skip with algo.init.mode=none, reuse with algo.init.values_path)")  # fmt: skip
        state = await estimate_values(
            runner, list(problems.values()), init.n0, path, workers=cfg.rollout.workers,
            seed=cfg.run.seed + 3, progress=on_estimate,
        )  # fmt: skip
        values = load_values(path, known=problems)
        source = str(path)
        log(f"initial values: {state.episodes} scored episodes in {state.wall_s:.0f} s, "
            f"{state.dropped} dropped, {state.unscored} unscored")  # fmt: skip
    tracker.init_from_scores(values, form=init.mode)
    out = {"source": source, **value_summary(values)}
    if len(values) < len(problems):
        log(f"note: {len(problems) - len(values)} prompts had no scored episode; their "
            "tracker starts from the prior")  # fmt: skip
    return out


class _Evaluator:
    """Held-out accuracy at fixed seeds and the paper's evaluation sampling (T 0.6, top-p
    0.95, top-k 20 by default). The stream keeps sampling meanwhile (its episodes share
    the engine), which slows an evaluation but does not change what it scores."""

    def __init__(self, cfg, runner, held_out, run_dir: Path) -> None:
        self.cfg, self.runner, self.held_out = cfg, runner, held_out
        self.dir = run_dir / "eval"
        self.step: int | None = None
        self.summary = None
        self.last_row: dict = {}

    async def run(self, step: int):
        from agent_spo.rollout import run_rollout

        t0 = time.perf_counter()
        self.summary = await run_rollout(
            self.runner, self.held_out, len(self.held_out), self.dir / f"step_{step:06d}.jsonl",
            workers=self.cfg.rollout.workers, seed=self.cfg.run.seed + 7,
        )  # fmt: skip
        self.step = step
        d = self.summary.to_dict()
        self.last_row = {
            "step": step,
            "eval/accuracy": d["accuracy"],
            "eval/tool_use_rate": d["tool_use_rate"],
            "eval/valid_call_rate": d["valid_call_rate"],
            "eval/episodes": d["scored"],
            "perf/eval_s": time.perf_counter() - t0,
        }
        return self.summary
