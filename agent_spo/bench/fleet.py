"""`agent-spo bench fleet`: what the replica pool costs, on real replica processes.

(a) **Weight sync against model size.** Qwen3-shaped random models (the demo's tokenizer)
    of about 1M, 10M and 100M parameters. One ``agent-spo engine serve`` replica per
    size; a pool syncs it ``repeats`` times through the disk path, then another pool as
    many times over gloo (the weights as the learner hands them over: parameters, tied
    ones once). Medians of the whole sync, of writing the buckets (disk), and of the rest
    (pause, load, resume), beside the in-process engine's copy of the same weights (what
    ``rollout.engine=hf`` does).
(b) **Episodes/s on the demo**: real episodes (tools in the sandbox, the verifier) on the
    demo model, ``episodes`` of them with ``workers`` in flight, through the in-process
    engine, a pool of one replica and a pool of two.
(c) **The pool's overhead**: short generations on one replica through the pool and
    through the bare HTTP client, alternating, one at a time: median latency of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, int]] = {  # name -> tiny_qwen3_config sizes
    "1M": {"hidden": 128, "layers": 4, "heads": 4},
    "10M": {"hidden": 384, "layers": 5, "heads": 6},
    "100M": {"hidden": 1024, "layers": 7, "heads": 8},
}


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


async def sync_costs(
    sizes: Sequence[str], repeats: int, tokenizer, work: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.engines.hf import HFEngine
    from agent_spo.engines.pool import ReplicaPool
    from agent_spo.engines.replicas import LocalReplica

    rows = []
    for name in sizes:
        model = random_model(tokenizer, seed=0, **SIZES[name])
        params = sum(p.numel() for p in model.parameters())
        model_dir = save_model_dir(model, tokenizer, work / f"model-{name}")
        log(f"sync {name}: {params:,} parameters, {repeats} syncs")
        weights = list(model.named_parameters())
        runs: dict[str, list[dict[str, float]]] = {"disk": [], "gloo": []}
        with LocalReplica(model_dir, threads=2, log_path=work / f"replica-{name}.log") as rep:
            version = 0
            for path in ("disk", "gloo"):
                pool = ReplicaPool([rep.url], sync_dir=work / f"sync-{name}", probe_s=600,
                                   transport=path, version=version)  # fmt: skip
                try:
                    await pool.start()
                    for _ in range(repeats):
                        version += 1
                        await pool.update_weights(weights, version)
                        runs[path].append(dict(pool.last_sync))
                finally:
                    await pool.close()
        engine = HFEngine(copy.deepcopy(model), tokenizer)
        local = []
        try:
            for k in range(repeats):
                t0 = time.perf_counter()
                await engine.update_weights(weights, k + 1)
                local.append(time.perf_counter() - t0)
        finally:
            await engine.close()
        for path, rs in runs.items():
            sync = _median([r["perf/weight_sync_s"] for r in rs])
            size = rs[0]["perf/weight_sync_bytes"]
            rows.append({
                "size": name, "path": path, "params": params, "bytes": size, "sync_s": sync,
                "write_s": _median([r["perf/weight_write_s"] for r in rs]),
                "load_s": _median([r["perf/weight_sync_s"] - r["perf/weight_write_s"]
                                   for r in rs]),
                "mb_per_s": size / 2**20 / sync, "in_process_s": _median(local),
            })  # fmt: skip
        del model, weights
    return rows


async def episode_rates(
    cfg, n: int, workers: int, repeats: int, work: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Episodes/s with the in-process engine and pools of 1 and 2 replicas."""
    from agent_spo import builders
    from agent_spo.engines.hf import HFEngine
    from agent_spo.engines.pool import ReplicaPool
    from agent_spo.engines.replicas import LocalReplica
    from agent_spo.episode.runner import EpisodeDropped, EpisodeRunner

    model_path = builders.resolve_model_path(cfg.model, log=log)
    train, _ = builders.build_datasets(cfg.data, cfg.run.seed)
    problems = train[:n]
    rows = []
    async with builders.build_sandbox(cfg.sandbox, cfg.rollout) as sandbox:
        with builders.build_verifier(cfg.verifier) as verifier:
            for setting, replicas in (("in-process engine", 0), ("pool, 1 replica", 1),
                                      ("pool, 2 replicas", 2)):  # fmt: skip
                with contextlib.ExitStack() as stack:
                    if replicas:
                        threads = 2 // replicas
                        reps = [stack.enter_context(LocalReplica(
                            model_path, threads=threads, log_path=work / f"ep-{replicas}-{i}.log",
                        )) for i in range(replicas)]  # fmt: skip
                    rates, drops = [], 0
                    for r in range(repeats):
                        if replicas:
                            engine: Any = ReplicaPool([x.url for x in reps])
                        else:
                            engine = HFEngine.from_pretrained(
                                model_path, max_batch=cfg.rollout.max_batch
                            )
                        tok = engine.tokenizer if not replicas else _tokenizer(model_path)
                        toolbox = builders.build_toolbox(cfg.rollout)
                        runner = EpisodeRunner(
                            engine, builders.build_renderer(tok, cfg.rollout, toolbox), toolbox,
                            sandbox, verifier,
                            builders.build_episode_settings(cfg.rollout, cfg.sandbox),
                        )  # fmt: skip
                        gate = asyncio.Semaphore(workers)

                        async def one(i: int, runner=runner, gate=gate, r=r) -> bool:
                            async with gate:
                                try:
                                    await runner.run(problems[i], seed=1000 * r + i)
                                    return True
                                except EpisodeDropped:
                                    return False

                        try:
                            t0 = time.perf_counter()
                            done = await asyncio.gather(*(one(i) for i in range(len(problems))))
                            rates.append(sum(done) / (time.perf_counter() - t0))
                            drops += len(done) - sum(done)
                        finally:
                            await engine.close()
                    log(f"{setting}: {_median(rates):.2f} episodes/s")
                    rows.append({"setting": setting, "episodes": len(problems),
                                 "episodes_per_s": _median(rates), "dropped": drops})  # fmt: skip
    return rows


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def pool_overhead(cfg, requests: int, work: Path) -> dict[str, Any]:
    """Median latency of one short generation, pool vs bare client, on one replica."""
    from agent_spo import builders
    from agent_spo.engines.base import Sampling
    from agent_spo.engines.openai_http import OpenAIHTTPEngine
    from agent_spo.engines.pool import ReplicaPool
    from agent_spo.engines.replicas import LocalReplica

    model_path = builders.resolve_model_path(cfg.model)
    prompt = _tokenizer(model_path)("What is 17 times 23?").input_ids
    sampling = Sampling(max_tokens=4, temperature=0.0)
    with LocalReplica(model_path, threads=2, log_path=work / "overhead.log") as rep:
        bare = OpenAIHTTPEngine(rep.url)
        pool = ReplicaPool([rep.url])
        try:
            for e in (bare, pool):  # connections open, model warm
                await e.generate(prompt, sampling)
            times: dict[str, list[float]] = {"client": [], "pool": []}
            for _ in range(requests):
                for name, e in (("client", bare), ("pool", pool)):
                    t0 = time.perf_counter()
                    await e.generate(prompt, sampling)
                    times[name].append(time.perf_counter() - t0)
        finally:
            await bare.close()
            await pool.close()
    client, through = _median(times["client"]), _median(times["pool"])
    return {"requests": requests, "client_ms": 1e3 * client, "pool_ms": 1e3 * through,
            "overhead_ms": 1e3 * (through - client), "ratio": through / client}  # fmt: skip


async def run_fleet_bench(
    cfg,
    *,
    sizes: Sequence[str] = ("1M", "10M", "100M"),
    repeats: int = 3,
    episodes: int = 64,
    workers: int = 32,
    episode_repeats: int = 1,
    requests: int = 50,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from agent_spo import builders

    hf_logging.disable_progress_bar()  # model saves and loads would flood the output
    model_path = builders.resolve_model_path(cfg.model, log=log)
    tokenizer = _tokenizer(model_path)
    report: dict[str, Any] = {"settings": {
        "sizes": list(sizes), "repeats": repeats, "episodes": episodes, "workers": workers,
        "episode_repeats": episode_repeats, "requests": requests}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="agent-spo-bench-fleet-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if sizes:
            report["sync"] = await sync_costs(sizes, repeats, tokenizer, work, log)
        if episodes:
            report["episodes"] = await episode_rates(
                cfg, episodes, workers, episode_repeats, work, log
            )
        if requests:
            report["overhead"] = await pool_overhead(cfg, requests, work)
        report["wall_s"] = time.perf_counter() - t0
    return report


def tables(report: dict[str, Any]) -> list:
    from rich.table import Table

    out = []
    if "sync" in report:
        t = Table(title="(a) weight sync to one replica (medians)")
        for c in ("model", "path", "parameters", "MiB", "sync s", "write s", "load s",
                  "MiB/s", "in-process copy s"):  # fmt: skip
            t.add_column(c, justify="right")
        for r in report["sync"]:
            t.add_row(r["size"], r["path"], f"{r['params']:,}", f"{r['bytes'] / 2**20:.1f}",
                      f"{r['sync_s']:.3f}", f"{r['write_s']:.3f}", f"{r['load_s']:.3f}",
                      f"{r['mb_per_s']:.0f}", f"{r['in_process_s']:.3f}")  # fmt: skip
        out.append(t)
    if "episodes" in report:
        t = Table(title="(b) demo episodes through each engine")
        for c in ("setting", "episodes", "episodes/s", "dropped"):
            t.add_column(c, justify="right")
        for r in report["episodes"]:
            t.add_row(r["setting"], str(r["episodes"]), f"{r['episodes_per_s']:.2f}",
                      str(r["dropped"]))  # fmt: skip
        out.append(t)
    if "overhead" in report:
        o = report["overhead"]
        t = Table(title=f"(c) one short generation, one replica (median of {o['requests']})")
        for c in ("bare client ms", "pool ms", "overhead ms", "ratio"):
            t.add_column(c, justify="right")
        t.add_row(f"{o['client_ms']:.2f}", f"{o['pool_ms']:.2f}", f"{o['overhead_ms']:.2f}",
                  f"{o['ratio']:.3f}")  # fmt: skip
        out.append(t)
    return out
