"""A learner rank other than 0: build the learner, then run rank 0's commands until "stop".

Started by rank 0 (``python -m agent_spo.dist.rank RANK`` with the spec in the environment)
or by torchrun through ``agent-spo train`` (see :func:`agent_spo.dist.driver.torchrun_worker`).
Each command is a name in the store (``cmd/<n>``), its arguments follow as a broadcast
from rank 0, and the rank runs the same learner method rank 0 runs, so every collective
inside it has its partner.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

from agent_spo.dist import group as G
from agent_spo.dist import torchrun_env

IDLE_WAIT = timedelta(days=7)  # between commands: a rollout can take long; a dead rank 0
# closes the store's socket, which ends the wait at once


def serve(learner, store) -> None:
    """Run rank 0's commands in order until "stop" (or until rank 0 is gone)."""
    from agent_spo.dist.driver import run_command

    n = 0
    while True:
        key = f"cmd/{n}"
        store.wait([key], IDLE_WAIT)
        name = store.get(key).decode()
        if name == "stop":
            return
        run_command(learner, name, None)
        n += 1


def main(rank: int, spec: G.RankSpec, store=None) -> None:
    """Join the group as ``rank``, build the learner, serve rank 0 until it stops."""
    import torch.distributed as dist

    from agent_spo.dist.driver import build

    if store is None:
        store = G.connect(spec, rank)
        store.set(f"ready/{rank}", "1")
    cmd = G.join(spec, rank, store)
    learner = build(spec, rank)
    cmd.set(f"built/{rank}", "1")
    try:
        serve(learner, cmd)
    finally:
        dist.destroy_process_group()


def torchrun_main(wait_s: float = 3600.0) -> None:
    """A rank above 0 under torchrun: wait (up to ``wait_s``: rank 0 checks the sandbox,
    loads data and the engine first) for rank 0's spec in torchrun's store, then serve."""
    import torch.distributed as dist

    found = torchrun_env()
    assert found is not None and found[0] > 0, "torchrun_main runs on ranks above 0"
    rank, world = found
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
        timeout=timedelta(seconds=wait_s),
    )  # fmt: skip
    store.wait([G.TORCHRUN_SPEC_KEY])
    spec = G.RankSpec.from_json(store.get(G.TORCHRUN_SPEC_KEY).decode())
    main(rank, spec, store)


if __name__ == "__main__":
    main(int(sys.argv[1]), G.RankSpec.from_json(os.environ[G.SPEC_ENV]))
