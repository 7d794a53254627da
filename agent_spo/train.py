"""A training run: builds the parts from a config, runs the loop, logs, checkpoints, resumes.

:func:`setup` builds every part once into a frozen :class:`Run`; :func:`train` runs the
loop (:mod:`agent_spo.pipeline`) and its side jobs (episode log, held-out evaluation,
metrics, checkpoints), each a named function called after every learner step. This
module owns the run directory:

    RUN_DIR/config.yaml        the resolved config
    RUN_DIR/metrics.jsonl      one line of namespaced metrics per learner step
    RUN_DIR/episodes.jsonl     every trained trajectory, with step, baseline and lag
    RUN_DIR/checkpoints/       atomic checkpoints (agent_spo.checkpoint)
    RUN_DIR/summary.json       final numbers, with held-out accuracy before and after
    RUN_DIR/.lock              held by the training process (agent_spo.rundir)

Nothing is written before the config, the data files and the model directory have been
checked. A run directory has one owner at a time: a second trainer on it fails at once.
``resume=True`` continues from the latest checkpoint: model, optimizer, tracker, sampler
RNG and step come back; the metrics and episode logs are cut back to what that
checkpoint had seen, so no batch is counted twice. A resume with nothing to do (no run
there, or a run already at train.total_steps) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from agent_spo import builders
from agent_spo.checkpoint import Checkpoint, latest_checkpoint, restore, save_checkpoint
from agent_spo.config import TrainConfig, check_trainable, write_resolved
from agent_spo.data.problems import Problem
from agent_spo.exact_drift import FILE as EXACT_FILE
from agent_spo.exact_drift import ExactDrift
from agent_spo.lora import NO_ADAPTERS, cli_args, describe, policy_weights, sends_adapter
from agent_spo.memory import check_memory
from agent_spo.metrics import MetricsLog, open_wandb, read_metrics
from agent_spo.rundir import check_unlocked, lock_run_dir

if TYPE_CHECKING:
    from agent_spo.rollout import RolloutSummary


class RunExists(RuntimeError):
    """The run directory already holds a run and neither resume nor a new name was given."""


class NothingToResume(RuntimeError):
    """--resume found no run to continue, or a run with no steps left to train."""


class UnsupportedConfig(ValueError):
    """A config value this trainer does not run yet, or cannot run as given; names the key."""


# Keys a resumed run may change: how long it runs, what it writes and where its tool code
# runs (the sandbox's address, token, pool), not what it learns.
_RESUMABLE_CHANGES = (
    "run.output_dir", "train.", "rollout.workers", "sandbox.",
    # sharded checkpoints read back at any world size
    "learner.world_size", "learner.rank_timeout_s", "learner.cpu_offload",
    "cluster.",  # where the processes run, not what they learn
)  # fmt: skip


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


@dataclass(frozen=True)
class Run:
    """The built parts of one training run, made once by :func:`setup`."""

    cfg: TrainConfig
    dir: Path
    ckpt: Checkpoint | None  # the checkpoint resumed from; None for a fresh run
    first_step: int  # learner steps already done (resume)
    problems: dict[str, Problem]  # training prompts by key
    held_out: list[Problem]
    engine: Any
    tokenizer: Any
    learner: Any  # agent_spo.learner.Learner
    runner: Any  # EpisodeRunner at the rollout settings
    eval_runner: Any  # EpisodeRunner at the evaluation settings
    tracker: Any  # ValueTracker, with its offline prior
    sampler: Any  # PrioritizedSampler
    loop: Any  # pipeline.TrainLoop for cfg.algo.name
    stream: Any  # pipeline.StreamSettings
    values: dict | None  # where the tracker's prior came from, and its summary
    log: Callable[[str], None]
    exact: Any = None  # ExactDrift: kl_exact's kept trajectories (None in other modes)
    wandb_run: Any = None  # the W&B run (train.wandb), opened by setup and finished with it


def check_inputs(cfg: TrainConfig, *, resume: bool = False) -> None:
    """Everything about the config and its inputs that can refuse the run, before the run
    directory is touched: the data files, train-only settings, the model directory, and
    for --resume a run to continue. Raises DatasetError, UnsupportedConfig or
    NothingToResume."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if resume and not (run_dir / "config.yaml").is_file():
        check_unlocked(run_dir)  # a run still starting up has no config.yaml yet
        raise NothingToResume(
            f"--resume: there is no run at {run_dir} (no config.yaml); start a new run "
            "without --resume"
        )
    train, _ = builders.build_datasets(cfg.data, cfg.run.seed)
    # the learner loads model.path, so train needs the weights whatever the engine
    problems = check_trainable(cfg, train_prompts=len(train)) + builders.check_model_path(cfg.model)
    problems += check_memory(cfg)[1]
    for wanted, key, module, extra in (  # optional packages, refused before any work
        (cfg.train.tensorboard, "train.tensorboard", "tensorboard", "tensorboard"),
        (cfg.train.wandb, "train.wandb", "wandb", "wandb"),
        (cfg.cluster.backend == "ray", "cluster.backend ray", "ray", "cluster"),
    ):
        if wanted and importlib.util.find_spec(module) is None:
            problems.append(f"{key} needs the {module} package: pip install 'agent-spo[{extra}]'")
    if problems:
        raise UnsupportedConfig("; ".join(problems))


def claim_run_dir(
    cfg: TrainConfig, *, resume: bool, log: Callable[[str], None]
) -> Checkpoint | None:
    """Decide, with the run directory locked, whether this is a fresh run or a resume, and
    refuse what has nothing to do; writes nothing. Returns the checkpoint to resume from
    (None: a fresh run)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt_root = run_dir / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    total = cfg.train.total_steps
    if ckpt is not None and ckpt.step >= total:
        more = f"resume with train.total_steps above {ckpt.step} to train further"
        if ckpt.step == total:
            raise NothingToResume(
                f"--resume: the run at {run_dir} is finished (its last checkpoint is step "
                f"{ckpt.step} = train.total_steps); {more}"
            )
        raise NothingToResume(
            f"--resume: the latest checkpoint, step {ckpt.step}, is past train.total_steps="
            f"{total}; {more}, or evaluate it with `agent-spo eval`"
        )
    if resume and ckpt is None:
        log(f"no checkpoint under {ckpt_root} yet; starting the run from scratch")
    if not resume and (
        any((run_dir / f).exists() for f in ("metrics.jsonl", "values.jsonl"))
        or latest_checkpoint(ckpt_root) is not None
    ):
        raise RunExists(
            f"{run_dir} already holds a run; pass --resume to continue it, or set run.name"
        )
    if cfg.algo.init.values_path is not None and cfg.algo.name == "spo" and ckpt is None:
        from agent_spo.values import load_values

        train, _ = builders.build_datasets(cfg.data, cfg.run.seed)
        load_values(cfg.algo.init.values_path, known={p.key for p in train})  # fails before work
    if resume:
        _check_resume_config(cfg, run_dir / "config.yaml")
    return ckpt


@contextlib.asynccontextmanager
async def setup(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_estimate: Callable | None = None,
) -> AsyncIterator[Run]:
    """Check the config, then build the run: engine, learner, runner, tracker (with its
    offline prior, estimated now if needed), sampler; restore them on resume. The engine,
    sandbox and verifier are closed on exit."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from agent_spo.episode.runner import EpisodeRunner

    check_inputs(cfg, resume=resume)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(lock_run_dir(run_dir))  # held until train() has finished
        ckpt = claim_run_dir(cfg, resume=resume, log=log)
        written = cfg  # config.yaml keeps the user's settings, not a cluster's addresses
        cluster = None
        if cfg.cluster.backend == "ray":  # engines and sandboxes start on the cluster now
            from agent_spo.cluster.ray_cluster import ray_cluster

            # the replicas start from the base model, which every node has; on --resume
            # the checkpoint's weights (on this node only) reach them by the first sync
            base_path = builders.resolve_model_path(cfg.model, log=log, rollout=cfg.rollout)
            cluster = stack.enter_context(ray_cluster(cfg, base_path, run_dir, log=log))
            cfg = cluster.apply(cfg)
        # a sandbox that cannot run code (server down, wrong token) refuses the run before
        # anything is written or loaded
        sandbox = await stack.enter_async_context(builders.build_sandbox(cfg.sandbox, cfg.rollout))
        await builders.check_sandbox(sandbox)
        write_resolved(written, run_dir)
        wandb_run = None
        if cfg.train.wandb:  # a W&B that cannot start fails now, not after value estimation
            wandb_run = open_wandb(
                run_dir, project=cfg.train.wandb_project, name=cfg.run.name,
                config=written.model_dump(mode="json"),
                resumed_at=ckpt.step if ckpt is not None else 0,
            )  # fmt: skip
            stack.callback(wandb_run.finish)
        hf_logging.disable_progress_bar()  # weight loads and shard writes would flood the log
        train_set, held_out = builders.build_datasets(cfg.data, cfg.run.seed)
        problems = {p.key: p for p in train_set}
        base_path = builders.resolve_model_path(cfg.model, log=log, rollout=cfg.rollout)
        # a checkpoint's model directory holds full weights when one process wrote it;
        # a sharded one is read into the learner and pushed to the engine below
        model_path = str(ckpt.model_dir) if ckpt and ckpt.has_weights else base_path
        if cluster is not None:  # learner ranks on other nodes: their cwd is not ours
            model_path = os.path.abspath(model_path)  # not resolved: links may differ per node
        first_step = ckpt.step if ckpt is not None else 0
        threads_before = apply_torch_threads(cfg)
        if threads_before is not None:
            stack.callback(_set_torch_threads, threads_before)
        sync_dir = None
        if cfg.rollout.engine == "openai_http":
            sync_dir = Path(os.path.abspath(cfg.rollout.sync_dir or run_dir / "weights"))
        engine = builders.build_engine(
            model_path, cfg.model, cfg.rollout, cfg.run.seed, sync_dir=sync_dir, log=log,
            lora=cfg.learner.lora, adapter_dir=run_dir / "adapters",
        )  # fmt: skip
        stack.push_async_callback(engine.close)
        if hasattr(engine, "start"):  # replicas: contacted now, and refused if none answers
            await engine.start()
        tokenizer = getattr(engine, "tokenizer", None) or AutoTokenizer.from_pretrained(model_path)
        learner = builders.build_learner(
            model_path, tokenizer, cfg.learner, cfg.loss,
            probe_tokens=cfg.algo.rho.probe_tokens, threads=torch_threads_for(cfg),
            launch=cluster.launch_rank if cluster else None,
            host=cluster.driver_ip if cluster else "127.0.0.1",
            rank0_device=cluster.rank0_device() if cluster else None,
        )  # fmt: skip
        stack.callback(learner.close)  # the other learner ranks stop with the run
        why_merged = NO_ADAPTERS
        if cfg.rollout.engine == "openai_http" and cfg.learner.lora.rank:
            why_merged = ("the replicas hold no adapter: start them with `agent-spo engine "
                          f"serve ... {' '.join(cli_args(cfg.learner.lora))}`")  # fmt: skip
        log(describe(learner.summary(), adapter_sync=sends_adapter(learner, engine),
                     why_merged=why_merged))  # fmt: skip
        if ckpt is None and getattr(engine, "needs_sync", False):
            # replicas left on other weights (an earlier run) get the starting ones
            await engine.update_weights(policy_weights(learner, engine), learner.version)
            log("engine replicas holding other weights were given the starting ones")
        verifier = stack.enter_context(builders.build_verifier(cfg.verifier))
        toolbox = builders.build_toolbox(cfg.rollout)
        renderer = builders.build_renderer(tokenizer, cfg.rollout, toolbox)
        if cfg.data.max_prompt_tokens is not None:
            cap = cfg.data.max_prompt_tokens
            kept, n_train = builders.cap_prompts(train_set, renderer, cap)
            held_out, n_held = builders.cap_prompts(held_out, renderer, cap)
            if not kept:
                raise UnsupportedConfig(
                    f"data.max_prompt_tokens: every training prompt is longer than {cap} "
                    "tokens as rendered (system prompt and tool schema included)"
                )
            if too_few := check_trainable(cfg, train_prompts=len(kept)):
                raise UnsupportedConfig(f"after data.max_prompt_tokens: {'; '.join(too_few)}")
            if n_train or n_held:
                log(f"dropped {n_train} training and {n_held} held-out prompts longer than "
                    f"data.max_prompt_tokens={cap} tokens as rendered")  # fmt: skip
            problems = {p.key: p for p in kept}
        settings = builders.build_episode_settings(cfg.rollout, cfg.sandbox, cfg.reward)
        T = cfg.train
        eval_settings = dataclasses.replace(
            settings, temperature=T.eval_temperature, top_p=T.eval_top_p, top_k=T.eval_top_k
        )
        runner = EpisodeRunner(engine, renderer, toolbox, sandbox, verifier, settings)
        eval_runner = EpisodeRunner(engine, renderer, toolbox, sandbox, verifier, eval_settings)
        tracker = builders.build_tracker(cfg.algo)
        exact = None
        if cfg.algo.name == "spo" and cfg.algo.rho.mode == "kl_exact":
            exact = ExactDrift()
        values = None
        if ckpt is not None:
            sampler = builders.build_sampler(cfg.algo, list(problems), tracker, cfg.run.seed)
            restore(ckpt, learner=learner, tracker=tracker, sampler=sampler)
            if exact is not None and (ckpt.path / EXACT_FILE).is_file():
                exact = ExactDrift.load(ckpt.path / EXACT_FILE)
            sampler.release_all()  # episodes in flight at the checkpoint are gone
            learner.version = ckpt.state["learner_version"]
            await engine.update_weights(policy_weights(learner, engine), learner.version)
            log(f"resumed from {ckpt.path.name} (step {first_step})")
        else:
            if cfg.algo.name == "spo" and cfg.algo.init.mode != "none":
                values = await _init_values(cfg, runner, problems, tracker, run_dir, log,
                                            on_estimate)  # fmt: skip
            sampler = builders.build_sampler(cfg.algo, list(problems), tracker, cfg.run.seed)
        yield Run(
            cfg=cfg, dir=run_dir, ckpt=ckpt, first_step=first_step, problems=problems,
            held_out=held_out, engine=engine, tokenizer=tokenizer, learner=learner,
            runner=runner, eval_runner=eval_runner, tracker=tracker, sampler=sampler,
            loop=builders.build_loop(cfg.algo.name, group_size=cfg.algo.grpo.group_size,
                                     exact_drift=exact),
            stream=builders.build_stream_settings(
                cfg, seed=cfg.run.seed + first_step, first_step=first_step
            ),
            values=values, log=log, exact=exact, wandb_run=wandb_run,
        )  # fmt: skip


@dataclass
class _Books:
    """The side jobs' open files and running totals (the one mutable part of a run)."""

    metrics: MetricsLog
    episodes: TextIO
    evaluator: _Evaluator
    t_start: float
    checkpoint_s: float = 0.0


async def train(run: Run, *, on_metrics: Callable[[dict], None] | None = None) -> dict:
    """Run the loop to train.total_steps; returns the summary (also in summary.json)."""
    cfg = run.cfg
    summary: dict = {"run_dir": str(run.dir), "algo": cfg.algo.name, "resumed_at": run.first_step}
    if run.values is not None:
        summary["values"] = run.values
    metrics_path, episodes_path = run.dir / "metrics.jsonl", run.dir / "episodes.jsonl"
    if run.ckpt is not None:  # cut the logs back to what the checkpoint had seen
        _truncate_jsonl(episodes_path, offset=run.ckpt.state["episode_log_offset"])
        _truncate_jsonl(metrics_path, max_step=run.first_step)
    else:
        for p in (metrics_path, episodes_path):
            p.unlink(missing_ok=True)
    evaluator = _Evaluator(cfg, run.eval_runner, run.held_out, run.dir)
    if _evaluating(run) and run.first_step == 0:
        summary["held_out_before"] = (await evaluator.run(0)).to_dict()
    elif run.first_step > 0:
        before = _step0_evaluation(metrics_path)
        if before:
            summary["held_out_before"] = before
    books = _Books(
        metrics=MetricsLog(run.dir, tensorboard=cfg.train.tensorboard, wandb=run.wandb_run),
        episodes=open(episodes_path, "a", encoding="utf-8"),
        evaluator=evaluator,
        t_start=time.perf_counter(),
    )
    if evaluator.step == 0:  # evaluated before training in this process
        books.metrics.write(evaluator.last_row)
    try:
        await run.loop(
            runner=run.runner, problems=run.problems, tracker=run.tracker, sampler=run.sampler,
            learner=run.learner, engine=run.engine, settings=run.stream,
            on_step=functools.partial(_after_step, run, books, on_metrics),
        )  # fmt: skip
        summary["train_s"] = round(time.perf_counter() - books.t_start, 1)
        summary["checkpoint_s"] = round(books.checkpoint_s, 1)
        if _evaluating(run):
            final = cfg.train.total_steps
            if evaluator.step != final:
                await evaluator.run(final)
                books.metrics.write(evaluator.last_row)
            assert evaluator.summary is not None  # set with evaluator.step by run()
            summary["held_out"] = evaluator.summary.to_dict()
    finally:
        books.metrics.close()
        books.episodes.close()
    summary["steps"] = cfg.train.total_steps
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.train.plot:
        _plot(run, summary)
    return summary


async def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_metrics: Callable[[dict], None] | None = None,
    on_estimate: Callable | None = None,
) -> dict:
    """Train as the config says: :func:`setup`, then :func:`train`; returns the summary."""
    async with setup(cfg, resume=resume, log=log, on_estimate=on_estimate) as run:
        return await train(run, on_metrics=on_metrics)


async def _after_step(run: Run, books: _Books, on_metrics, row: dict, batch) -> None:
    """The side jobs after learner step ``row["step"]``, in order: episode log, held-out
    evaluation, metrics, progress callback, checkpoint."""
    step, cfg = row["step"], run.cfg
    stats = getattr(run.runner.sandbox, "stats", None)
    if stats is not None:  # a sandbox fleet: each server's load
        row.update(stats())
    log_episodes(run, books.episodes, step, batch)
    row["perf/elapsed_s"] = time.perf_counter() - books.t_start
    every = cfg.train.eval_every
    if _evaluating(run) and (step % every == 0 or step == cfg.train.total_steps):
        await books.evaluator.run(step)
        row.update(books.evaluator.last_row)
    if step % cfg.train.log_every == 0 or step == cfg.train.total_steps or "eval/accuracy" in row:
        books.metrics.write(row)
    if on_metrics is not None:
        on_metrics(row)
    if step % cfg.train.checkpoint_every == 0 or step == cfg.train.total_steps:
        t_save = time.perf_counter()
        await save(run, step, episode_log_offset=books.episodes.tell())
        books.checkpoint_s += time.perf_counter() - t_save


def _evaluating(run: Run) -> bool:
    """Whether the run scores a held-out split (train.eval_every = 0 turns it off)."""
    return bool(run.held_out) and run.cfg.train.eval_every > 0


def log_episodes(run: Run, out: TextIO, step: int, batch) -> None:
    """Append the step's trained trajectories, each with what the learner made of it."""
    for b in batch:
        rec = json.loads(b.traj.to_json())
        rec["train"] = {"step": step, "v_hat": b.v_hat, "v_after": b.v_after, "adv": b.adv,
                        "group": b.group, "lag": b.traj.staleness(run.learner.version - 1)}  # fmt: skip
        out.write(json.dumps(rec) + "\n")
    out.flush()


async def save(run: Run, step: int, *, episode_log_offset: int) -> None:
    """Checkpoint the run at ``step``.

    Tracker and sampler are copied now: workers keep updating them while the files are
    written. The weights and optimizer hold still, since the learner waits for this
    step's side jobs, so the disk work runs in a thread and episodes keep flowing.
    """
    learner = run.learner
    await asyncio.to_thread(
        save_checkpoint, run.dir / "checkpoints", step=step, learner=learner,
        tokenizer=run.tokenizer, tracker=run.tracker.state_dict(),
        sampler=run.sampler.state_dict(), learner_version=learner.version,
        episode_log_offset=episode_log_offset,
        files={EXACT_FILE: run.exact.snapshot().save} if run.exact is not None else None,
    )  # fmt: skip


def _step0_evaluation(metrics_path: Path) -> dict | None:
    """A resumed run's before-training evaluation, from the kept metrics."""
    rows = [r for r in read_metrics(metrics_path) if r.get("step") == 0 and "eval/accuracy" in r]
    if not rows:
        return None
    return {
        "accuracy": rows[0]["eval/accuracy"],
        "tool_use_rate": rows[0]["eval/tool_use_rate"],
        "scored": rows[0]["eval/episodes"],
    }


def _plot(run: Run, summary: dict) -> None:
    from agent_spo.plot import plot_run

    try:
        summary["plot"] = str(plot_run(run.dir))
    except Exception as e:  # noqa: BLE001 - a plot must never cost the run its summary
        run.log(f"warning: could not draw the curves: {e}")


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


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
        log(f"initial values: {state.episodes} scored episodes in {state.wall_s:.0f} s, "
            f"{state.dropped} dropped, {state.unscored} unscored")  # fmt: skip
        if why := state.failure():  # a prior from the survivors alone would be biased
            from agent_spo.pipeline import AllEpisodesDropped

            raise AllEpisodesDropped(f"initial value estimate: {why}")
        values = load_values(path, known=problems)
        source = str(path)
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
        self.summary: RolloutSummary | None = None
        self.last_row: dict = {}

    async def run(self, step: int):
        from agent_spo.rollout import run_rollout

        t0 = time.perf_counter()
        self.summary = await run_rollout(
            self.runner, self.held_out, len(self.held_out), self.dir / f"step_{step:06d}.jsonl",
            workers=self.cfg.rollout.workers, seed=self.cfg.run.seed + 7,
        )  # fmt: skip
        if why := self.summary.failure():  # accuracy over the survivors would mislead
            from agent_spo.pipeline import AllEpisodesDropped

            raise AllEpisodesDropped(f"held-out evaluation at step {step}: {why}")
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
