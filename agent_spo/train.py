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

import json
import time
from collections.abc import Callable
from pathlib import Path

from agent_spo import builders
from agent_spo.checkpoint import latest_checkpoint, restore, save_checkpoint
from agent_spo.config import TrainConfig, write_resolved


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
    if cfg.algo.init.values_path is not None:
        problems.append("algo.init.values_path: offline value initialisation is not built yet")
    for key in ("kl_coef", "entropy_coef"):
        if getattr(cfg.loss, key) != 0:
            problems.append(f"loss.{key}: the learner has no reference/entropy term yet; use 0")
    if problems:
        raise UnsupportedConfig("; ".join(problems))


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
) -> dict:
    """Train as the config says; returns the summary (also written to summary.json)."""
    _check_supported(cfg)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt_root = run_dir / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if resume and ckpt is None:
        log(f"no checkpoint under {ckpt_root}; starting from scratch")
    if not resume and (run_dir / "metrics.jsonl").exists():
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
    write_resolved(cfg, run_dir)
    if cfg.algo.name == "spo" and cfg.algo.init.mode != "none":
        log(
            "note: offline value initialisation (algo.init) is not built yet; the tracker "
            "starts from its prior, as with algo.init.mode=none"
        )
    base_path = builders.resolve_model_path(cfg.model, log=log)
    model_path = str(ckpt.model_dir) if ckpt else base_path

    engine = builders.build_engine(model_path, cfg.model, cfg.rollout, cfg.run.seed)
    try:
        return await _train(cfg, engine, model_path, ckpt, run_dir, ckpt_root, problems,
                            held_out, log, on_metrics)  # fmt: skip
    finally:
        await engine.close()


async def _train(cfg, engine, model_path, ckpt, run_dir, ckpt_root, problems, held_out, log,
                 on_metrics) -> dict:  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_spo.episode.runner import EpisodeRunner
    from agent_spo.learner import Learner
    from agent_spo.pipeline import StreamSettings, train_grpo, train_spo
    from agent_spo.rollout import run_rollout

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
    )  # fmt: skip
    tracker = builders.build_tracker(cfg.algo)
    sampler = builders.build_sampler(cfg.algo, list(problems), tracker, cfg.run.seed)
    metrics_path, episodes_path = run_dir / "metrics.jsonl", run_dir / "episodes.jsonl"
    first_step = 0
    if ckpt is not None:
        restore(ckpt, optimizer=learner.opt, tracker=tracker, sampler=sampler)
        sampler.release_all()  # episodes in flight at the checkpoint are gone
        learner.version = ckpt.state["learner_version"]
        await engine.update_weights(learner.named_weights(), learner.version)
        first_step = ckpt.step
        _truncate_jsonl(episodes_path, offset=ckpt.state["episode_log_offset"])
        _truncate_jsonl(metrics_path, max_step=first_step)
        log(f"resumed from {ckpt.path.name} (step {first_step})")
    else:
        for p in (metrics_path, episodes_path):
            p.unlink(missing_ok=True)

    toolbox = builders.build_toolbox(cfg.rollout)
    renderer = builders.build_renderer(tokenizer, cfg.rollout, toolbox)
    settings = builders.build_episode_settings(cfg.rollout, cfg.sandbox)
    stream = StreamSettings(
        batch_size=L.batch_size, total_steps=cfg.train.total_steps,
        workers=cfg.rollout.workers, max_staleness=L.max_staleness,
        baseline=cfg.algo.baseline, seed=cfg.run.seed + first_step, first_step=first_step,
        adv_eps=cfg.algo.adv_eps, grpo_std_eps=cfg.algo.grpo.std_eps,
    )  # fmt: skip
    t_start = time.perf_counter()
    summary: dict = {"run_dir": str(run_dir), "algo": cfg.algo.name, "resumed_at": first_step}
    with builders.build_verifier(cfg.verifier) as verifier:
        async with builders.build_sandbox(cfg.sandbox) as sandbox:
            runner = EpisodeRunner(engine, renderer, toolbox, sandbox, verifier, settings)
            mlog = open(metrics_path, "a", encoding="utf-8")
            elog = open(episodes_path, "a", encoding="utf-8")

            def on_step(metrics: dict, batch) -> None:
                step = metrics["step"]
                if cfg.algo.name == "grpo":
                    items = [(t, None) for _, g in batch for t in g]
                else:
                    items = [(b.traj, b.v_hat) for b in batch]
                for traj, v_hat in items:
                    row = json.loads(traj.to_json())
                    row["train"] = {"step": step, "v_hat": v_hat,
                                    "lag": traj.staleness(learner.version - 1)}  # fmt: skip
                    elog.write(json.dumps(row) + "\n")
                elog.flush()
                metrics["perf/elapsed_s"] = time.perf_counter() - t_start
                if step % cfg.train.log_every == 0 or step == cfg.train.total_steps:
                    mlog.write(json.dumps(metrics) + "\n")
                    mlog.flush()
                if on_metrics is not None:
                    on_metrics(metrics)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.total_steps:
                    save_checkpoint(
                        ckpt_root, step=step, model=learner.model, tokenizer=tokenizer,
                        optimizer=learner.opt, tracker=tracker, sampler=sampler,
                        learner_version=learner.version, episode_log_offset=elog.tell(),
                    )  # fmt: skip

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
            finally:
                mlog.close()
                elog.close()
            summary["train_s"] = round(time.perf_counter() - t_start, 1)
            if held_out:
                held = await run_rollout(
                    runner, held_out, len(held_out), run_dir / "held_out.jsonl",
                    workers=cfg.rollout.workers, seed=cfg.run.seed + 7,
                )  # fmt: skip
                summary["held_out"] = held.to_dict()
    summary["steps"] = cfg.train.total_steps
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
