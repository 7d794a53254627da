"""The learner on several processes: FSDP2 shards (:mod:`.fsdp`), rank launch and failure
detection (:mod:`.group`), rank 0's handle (:mod:`.driver`) and the other ranks' loop
(:mod:`.rank`). World size 1 never touches this package."""

from __future__ import annotations

import os


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun, else None (RANK and
    WORLD_SIZE alone do not count: other libraries set them for their own groups)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


__all__ = ["torchrun_env"]
