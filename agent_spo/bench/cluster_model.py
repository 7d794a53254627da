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
* episodes keep running during steps and syncs (the asynchronous stream), within the
  pipeline's limits: SPO starts at most trained + (1 + ``max_staleness``) x B episodes
  (its sampling budget; a dropped one gives its place back), GRPO's finished groups wait
  in a queue of B/G groups and a worker whose group finds it full waits. When a batch is
  built (the learner free, B waiting), trajectories more than ``max_staleness`` versions
  older than the learner are dropped (counted, not trained), as the pipeline does.

Reported per mode and N: trajectories trained per second, the learner's idle share (time
with no full batch to train on / wall time), the first batch's time, the sync's time.
"""

from __future__ import annotations

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
    B, S = a.batch, a.max_staleness
    # (time, order, kind, version, tokens): kind "done" = an episode (group) finished,
    # "synced" = a step and its sync are over
    heap: list[tuple[float, int, str, int, float]] = []
    order = itertools.count()
    version = 0  # steps done and synced
    started = trained = stale = steps = 0
    buffered: list[tuple[float, int]] = []  # (tokens, version) finished, not yet trained
    pending: list[list[tuple[float, int]]] = []  # GRPO groups waiting for queue room
    waiting = 0  # SPO workers held by the sampling budget
    busy, idle_since, idle, first, last_end = False, 0.0, 0.0, None, 0.0
    step_times: list[float] = []

    def budget_open() -> bool:  # the pipeline's _SamplingBudget
        return started < trained + (1 + S) * B

    def start(t: float) -> None:
        nonlocal started
        members = [next(times) for _ in range(g)]
        tokens = sum(CAP_TOKENS * d / t_max for d in members)
        started += g
        heapq.heappush(heap, (t + max(members), next(order), "done", version, tokens))

    def restart_waiting(t: float) -> None:
        nonlocal waiting
        while waiting and budget_open():
            waiting -= 1
            start(t)

    def take_batch(t: float) -> None:
        nonlocal buffered, busy, idle, first, stale, started
        if busy or len(buffered) < B:
            return
        fresh = [x for x in buffered if version - x[1] <= S]  # judged as the batch is built
        dropped = len(buffered) - len(fresh)
        stale += dropped
        buffered = fresh
        if g == 1 and dropped:  # SPO: a dropped episode gives its place back
            started -= dropped
            restart_waiting(t)
        if len(buffered) < B:
            return
        idle += t - idle_since
        first = t if first is None else first
        batch, buffered = buffered[:B], buffered[B:]
        step_s = sum(x[0] for x in batch) / (learners * a.learner_tokens_per_gpu_s)
        step_times.append(step_s)
        busy = True
        heapq.heappush(heap, (t + step_s + sync_s, next(order), "synced", 0, 0.0))
        while pending and len(buffered) + g <= B:  # GRPO: room in the queue again
            buffered.extend(pending.pop(0))
            start(t)

    for _ in range(max(1, in_flight // g)):
        start(0.0)
    while steps < a.steps:
        t, _, kind, v, tokens = heapq.heappop(heap)
        if kind == "synced":
            version += 1
            steps += 1
            trained += B
            busy, idle_since, last_end = False, t, t
            restart_waiting(t)
        elif g == 1:  # SPO: into the stream; the worker goes on if the budget allows
            buffered.append((tokens, v))
            if budget_open():
                start(t)
            else:
                waiting += 1
        else:  # GRPO: into a queue of B/G groups; a worker waits while it is full
            group = [(tokens / g, v)] * g
            if len(buffered) + g <= B:
                buffered.extend(group)
                start(t)
            else:
                pending.append(group)
        take_batch(t)
    free_at = last_end
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
