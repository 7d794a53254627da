"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint is a directory ``ckpt-{step:06d}/`` under the run's ``checkpoints/``:

* ``state/``: the weights and the optimizer state, written by every learner rank with
  ``torch.distributed.checkpoint`` and readable at any world size;
* ``model/``: config and tokenizer, and with one learner process also the full weights
  as a Hugging Face model directory (``agent-spo export`` writes one from any checkpoint);
* ``state.json``: step, learner version, tracker state, sampler state (with its RNG),
  the episode-log offset in bytes, and anything else the loop passes in ``extra``.

It is written under a temporary name and renamed into place, then ``latest`` (a one-line
file naming it) is replaced atomically. A crash mid-write leaves only a ``.tmp-*``
directory, which :func:`latest_checkpoint` ignores and :func:`save_checkpoint` cleans up,
so the previous checkpoint stays the one a resume reads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict  # state.json

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def optimizer_path(self) -> Path:  # checkpoints written before sharded state
        return self.path / "optimizer.pt"

    @property
    def sharded(self) -> bool:
        """Whether weights and optimizer are in ``state/`` (any world size reads them)."""
        return (self.path / "state" / ".metadata").is_file()

    @property
    def has_weights(self) -> bool:
        """Whether ``model/`` holds full weights (a model directory to load or export)."""
        return any(self.model_dir.glob("*.safetensors")) or any(self.model_dir.glob("*.bin"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    *,
    step: int,
    learner,
    tokenizer,
    tracker,
    sampler,
    learner_version: int,
    episode_log_offset: int = 0,
    extra: dict[str, Any] | None = None,
    files: dict[str, Callable[[Path], None]] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep``.

    ``learner`` (a Learner or a LearnerGroup) writes its weights and optimizer there
    (every rank, into the same directory: on several machines it must be shared).
    ``tracker`` and ``sampler`` are the objects or their ``state_dict()`` snapshots (taken
    by a caller that writes from a thread while they keep changing). ``files`` maps a
    file name to a function that writes it (e.g. kl_exact's kept trajectories).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"ckpt-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    learner.save_state(tmp, tokenizer)
    for name, write in (files or {}).items():
        write(tmp / name)
    state = {
        "step": step,
        "learner_version": learner_version,
        "episode_log_offset": episode_log_offset,
        "tracker": tracker if isinstance(tracker, dict) else tracker.state_dict(),
        "sampler": sampler if isinstance(sampler, dict) else sampler.state_dict(),
        **(extra or {}),
    }
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / f".latest-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    pointer.replace(root / "latest")
    _fsync_dir(root)
    for old in sorted(root.glob("ckpt-*"))[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The checkpoint ``latest`` names, or the newest complete one; None if there is none."""
    root = Path(root)
    candidates = []
    pointer = root / "latest"
    if pointer.exists():
        candidates.append(root / pointer.read_text().strip())
    candidates += sorted(root.glob("ckpt-*"), reverse=True)
    for path in candidates:
        state_file = path / "state.json"
        if not state_file.exists():
            continue
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            continue
        return Checkpoint(path, int(state["step"]), state)
    return None


def restore(ckpt: Checkpoint, *, learner, tracker, sampler) -> None:
    """Load the weights and optimizer into the learner (at any world size), and the
    tracker and sampler state. A checkpoint from before sharded state holds its weights
    in model_dir (the learner was built from it) and its optimizer in optimizer.pt."""
    if ckpt.sharded:
        learner.load_state(ckpt.path)
    else:
        import torch

        if getattr(learner, "opt", None) is None or getattr(learner, "world_size", 1) > 1:
            raise ValueError(
                f"{ckpt.path} was written before sharded checkpoints: resume it with "
                "learner.world_size=1 and learner.cpu_offload=false"
            )
        learner.opt.load_state_dict(torch.load(ckpt.optimizer_path, weights_only=True))
    tracker.load_state_dict(ckpt.state["tracker"])
    sampler.load_state_dict(ckpt.state["sampler"])
