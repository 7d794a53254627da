"""The throughput model at cluster scale: SPO's stream against GRPO's group barrier on N
GPUs, with the learner's step and the weight sync taking time (``bench throughput
--scale-gpus``).

A discrete-event timeline, no measurement. Its assumptions (also in the report):

* **layout**: N GPUs, half learner ranks (FSDP2), half engine replicas (tensor-parallel
  size 1), as in ``configs/qwen3_8b_spo_cluster.yaml``;
* **episodes**: each replica keeps ``per_replica`` episodes in flight, so W = per_replica x
  N/2; episode i (in start order) takes the i-th of the paper's 48 episode times, cycled
  (61-553 s, :func:`~agent_spo.bench.stragglers.paper_times`): GRPO's groups of 8 are the
  paper's groups. An episode's length in tokens is its time scaled so that the slowest
  (553 s) hits the 16,384-token cap;
* **learner**: a step on B trajectories takes their tokens / (N/2 x
  ``learner_tokens_per_gpu_s``);
* **sync**: after each step the trainer sends the weights (``model_gib``) to every
  replica in turn at ``sync_mib_s`` (the gloo path's rate from ``bench fleet``), or once
  to all (``sync_broadcast``: what an NCCL broadcast would do; not built); the learner
  starts the next step after the sync;
* episodes keep running during steps and syncs (the asynchronous stream), finished
  trajectories wait in order, and when a batch is built (the learner free, B waiting)
  those more than ``max_staleness`` versions older than the learner are dropped
  (counted, not trained), as the pipeline does.

Reported per mode and N: trajectories trained per second, the learner's idle share (time
with no full batch to train on / wall time), the first batch's time, the sync's time.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import asdict, dataclass

from agent_spo.bench.stragglers import PAPER_GROUP_SIZE, paper_times

CAP_TOKENS = 16384


@dataclass(frozen=True)
class ClusterAssumptions:
    batch: int = 2048
    group_size: int = PAPER_GROUP_SIZE
    per_replica: int = 64  # episodes in flight per replica (configs: 512 workers / 8)
    learner_tokens_per_gpu_s: float = (
        6000.0  # 8B: 6 x 8.2 GFLOP/token + the log-prob pass at 40% of 989 TFLOP/s
    )
    model_gib: float = 15.3  # Qwen3-8B in bf16 (8.19B parameters x 2 bytes)
    sync_mib_s: float = 838.0  # bench fleet: gloo, 100M model, 2-core CPU machine
    sync_broadcast: bool = False  # one send reaches every replica (NCCL broadcast: not built)
    max_staleness: int = 4
    steps: int = 12


@dataclass(frozen=True)
class ClusterPoint:
    mode: str
    gpus: int
    replicas: int
    learner_gpus: int
    in_flight: int
    traj_per_s: float
    idle_frac: float
    first_batch_s: float
    learner_step_s: float
    sync_s: float
    dropped_stale: int


def cluster_timeline(
    mode: str, gpus: int, a: ClusterAssumptions = ClusterAssumptions()
) -> ClusterPoint:
    """The modelled run of ``a.steps`` learner steps for ``mode`` (spo or grpo) on ``gpus``."""
    if mode not in ("spo", "grpo") or gpus < 2 or gpus % 2:
        raise ValueError(f"mode spo or grpo and an even number of GPUs >= 2, got {mode}, {gpus}")
    g = a.group_size if mode == "grpo" else 1
    replicas = learners = gpus // 2
    in_flight = a.per_replica * replicas
    times = itertools.cycle(paper_times())
    t_max = float(max(paper_times()))
    sync_s = (1 if a.sync_broadcast else replicas) * a.model_gib * 1024 / a.sync_mib_s
    heap: list[tuple[float, int, int, float]] = []  # (finish, order, version, tokens)
    order = itertools.count()
    synced: list[float] = []  # when each new version reached the replicas

    def version_at(t: float) -> int:
        return bisect.bisect_right(synced, t)

    def start(t: float) -> None:
        members = [next(times) for _ in range(g)]
        tokens = sum(CAP_TOKENS * d / t_max for d in members)
        heapq.heappush(heap, (t + max(members), next(order), version_at(t), tokens))

    for _ in range(max(1, in_flight // g)):
        start(0.0)
    buffered: list[tuple[float, int]] = []  # (tokens, version) finished, not yet trained
    free_at = 0.0  # when the learner is done with its step and sync
    idle = 0.0
    first = None
    trained = stale = steps = 0
    step_times = []
    while steps < a.steps:
        t, _, v, tokens = heapq.heappop(heap)
        start(t)
        buffered.extend([(tokens / g, v)] * g)
        if len(buffered) < a.batch:
            continue
        begin = max(t, free_at)  # the step starts once the learner is free
        # as the pipeline does when it builds a batch: what is too stale is dropped
        now = version_at(begin)
        fresh = [x for x in buffered if now - x[1] <= a.max_staleness]
        stale += len(buffered) - len(fresh)
        buffered = fresh
        if len(buffered) < a.batch:
            continue
        idle += max(0.0, t - free_at)  # the learner waited for this batch
        first = begin if first is None else first
        batch, buffered = buffered[: a.batch], buffered[a.batch :]
        step_s = sum(x[0] for x in batch) / (learners * a.learner_tokens_per_gpu_s)
        step_times.append(step_s)
        free_at = begin + step_s + sync_s
        synced.append(free_at)  # the new weights are on the replicas once the sync is done
        trained += a.batch
        steps += 1
    wall = free_at
    return ClusterPoint(
        mode=mode, gpus=gpus, replicas=replicas, learner_gpus=learners, in_flight=in_flight,
        traj_per_s=trained / wall, idle_frac=idle / wall, first_batch_s=first or 0.0,
        learner_step_s=sum(step_times) / len(step_times), sync_s=sync_s, dropped_stale=stale,
    )  # fmt: skip


def scale_report(gpus: list[int], a: ClusterAssumptions = ClusterAssumptions()) -> dict:
    """SPO and GRPO at each GPU count, with the assumptions."""
    rows = []
    for n in gpus:
        spo, grpo = cluster_timeline("spo", n, a), cluster_timeline("grpo", n, a)
        rows.append({"spo": asdict(spo), "grpo": asdict(grpo),
                     "traj_per_s_ratio": spo.traj_per_s / grpo.traj_per_s})  # fmt: skip
    return {"assumptions": asdict(a), "rows": rows}


__all__ = ["ClusterAssumptions", "ClusterPoint", "cluster_timeline", "scale_report"]
