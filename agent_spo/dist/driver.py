"""Rank 0's handle on a learner spread over N ranks: the :class:`Learner` methods the
trainer calls, each run on every rank at once.

A call names its command in the store (``cmd/<n>``: the other ranks wait there between
steps, however long a rollout takes), broadcasts its arguments (the batch, the
advantages) from rank 0, and runs the learner's own method on every rank; the
collectives inside it (FSDP's gathers and reductions, the stats' sums) pair up because
every rank runs the same code on the same batch.

A rank that dies makes the call fail at once (its sockets close); one that hangs makes it
fail after ``timeout_s``. Either way the call raises :class:`RankFailed` naming what is
known (which child exited and how), and the handle refuses further calls.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator, Sequence

import torch

from agent_spo.dist import group as G
from agent_spo.dist.group import RankFailed, RankSpec


def build(spec: RankSpec, rank: int):
    """This rank's learner, from the spec's factory."""
    module, _, name = spec.factory.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(**spec.kwargs, rank=rank, world_size=spec.world_size)


def _receive(args):
    """Rank 0's ``args`` on every rank."""
    import torch.distributed as dist

    box = [args]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_command(learner, name: str, args):
    """Every rank: take rank 0's arguments and run command ``name`` on the learner."""
    args = _receive(args)
    if name == "step":
        return learner.step(*args)
    if name == "logprobs":
        return learner.token_logprobs(args)
    if name == "version":
        learner.version = args
        return None
    if name == "weights":  # rank 0 streams them through LearnerGroup.named_weights
        for _ in learner.named_weights(adapter_only=bool(args)):
            pass
        return None
    if name == "save":
        return learner.save_state(*args)
    if name == "load":
        return learner.load_state(*args)
    raise ValueError(f"unknown learner command {name!r}")


class LearnerGroup:
    """The learner on N ranks, used by the trainer exactly like a :class:`Learner`."""

    def __init__(self, group: G.Group, learner) -> None:
        self.group = group
        self.learner = learner
        self._n = 0  # next command number
        self._broken: str | None = None

    @classmethod
    def start(cls, spec: RankSpec, launch: G.Launch | None = None) -> LearnerGroup:
        group = G.start(spec, launch)
        try:
            learner = build(spec, 0)
            deadline = time.monotonic() + spec.start_bound_s
            for rank in range(1, spec.world_size):  # every rank has built its learner
                while not group.store.check([f"built/{rank}"]):
                    if group.failed() or time.monotonic() > deadline:
                        raise RankFailed(
                            f"learner rank {rank} did not build its learner: "
                            f"{group.failed() or f'nothing within {spec.start_bound_s:g}s'}"
                        )
                    time.sleep(0.05)
        except BaseException:
            _abandon(group)
            raise
        return cls(group, learner)

    # ------------------------------------------------------------ the Learner surface
    @property
    def model(self):
        return self.learner.model

    @property
    def lora(self) -> bool:
        return self.learner.lora

    def summary(self) -> dict:
        return self.learner.summary()  # full sizes: the same on every rank

    @property
    def world_size(self) -> int:
        return self.group.spec.world_size

    @property
    def version(self) -> int:
        return self.learner.version

    @version.setter
    def version(self, value: int) -> None:
        self._call("version", value)

    def step(self, trajs: Sequence, adv: Sequence[float]):
        return self._call("step", (_slim(trajs), list(adv)))

    def token_logprobs(self, trajs: Sequence) -> list[torch.Tensor]:
        return self._call("logprobs", _slim(trajs))

    def named_weights(self, adapter_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """The full weights (or the adapter alone), one tensor at a time, each gathered
        from every rank's shard. The other ranks gather every tensor, so a consumer that
        stops early is drained."""
        self._announce("weights")
        self._guard(lambda: _receive(adapter_only))
        weights = self.learner.named_weights(adapter_only)
        try:
            while True:
                try:
                    item = next(weights)
                except StopIteration:
                    return
                yield item
        except GeneratorExit:
            if self._broken is None and self.group.store is not None:
                try:
                    for _ in weights:  # keep the ranks' gathers paired
                        pass
                except Exception as e:  # noqa: BLE001 - closing: record, do not raise
                    self._failure(e)
            raise
        except Exception as e:
            raise self._failure(e) from e

    def save_state(self, path, tokenizer=None) -> None:
        self._call("save", (str(path), tokenizer))

    def load_state(self, path) -> None:
        self._call("load", (str(path),))

    def close(self) -> None:
        """Stop the other ranks and leave the group (idempotent)."""
        if self.group.store is None:
            return
        if self._broken is None:
            try:
                self.group.store.set(f"cmd/{self._n}", "stop")
            except Exception:  # noqa: BLE001 - the store is gone: nothing left to stop
                pass
        _abandon(self.group)

    # ------------------------------------------------------------ plumbing
    def _announce(self, name: str) -> None:
        if self._broken is not None:
            raise RankFailed(f"the learner group failed earlier: {self._broken}")
        self.group.store.set(f"cmd/{self._n}", name)
        self._n += 1

    def _call(self, name: str, args):
        self._announce(name)
        return self._guard(lambda: run_command(self.learner, name, args))

    def _guard(self, fn):
        try:
            return fn()
        except Exception as e:
            raise self._failure(e) from e

    def _failure(self, e: Exception) -> Exception:
        """What a failed call raises. A communication failure (a rank died or hung) is
        RankFailed naming what is known; anything else (a bug, an out-of-memory on rank 0,
        a checkpoint path every rank failed to write) is raised as it is. Either way the
        group is finished: the other ranks may be inside a collective that will never
        pair up, so the ones this process started are killed now, not at close."""
        text = str(e)
        comm = any(
            s in text.lower() for s in ("timed out", "timeout", "connection", "closed", "peer")
        )
        time.sleep(0.2)  # a dying child's exit code lands just after its sockets close
        dead = self.group.failed() if comm else None
        self._broken = dead or (text.splitlines() or [type(e).__name__])[0][:300]
        for child in self.group.children.values():
            if child.poll() is None:
                child.kill()
        if not comm:
            return e
        why = dead or (
            f"a learner rank stopped answering (timeout {self.group.spec.timeout_s:g}s, "
            "learner.rank_timeout_s): " + self._broken
        )
        return RankFailed(f"learner group failed: {why}")


def _slim(trajs: Sequence) -> list:
    """The trajectories without what the learner does not read (tool results, timings,
    info), to keep the broadcast small."""
    import dataclasses

    return [dataclasses.replace(t, tool_calls=(), timings={}, info={}) for t in trajs]


def _abandon(group: G.Group) -> None:
    import torch.distributed as dist

    group.stop_children(grace_s=10.0)
    if dist.is_initialized():
        dist.destroy_process_group()
    group.store = None  # type: ignore[assignment]


__all__ = ["LearnerGroup", "RankFailed", "RankSpec", "build", "run_command"]
