"""An optional outer cap for each local worker: a pids cgroup (and its cleanup).

RLIMIT_NPROC does not bind processes whose host uid is root, which is what the jail's
uid maps to when the trainer itself runs as root. There, each worker's jail goes into its
own pids cgroup (v1 `pids` hierarchy, or a delegated v2 one), so a fork bomb stops at
`pids.max` however it is run. Without root or without a writable hierarchy this is
skipped and RLIMIT_NPROC applies as usual.
"""

from __future__ import annotations

import os
from pathlib import Path

_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


def _hierarchy() -> Path | None:
    for root in _ROOTS:
        has_pids = (root / "cgroup.procs").exists() and (
            root.name == "pids" or "pids" in _read(root / "cgroup.subtree_control")
        )
        if has_pids and os.access(root, os.W_OK):
            return root
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def create(name: str, pids_max: int) -> Path | None:
    """A fresh pids cgroup, or None when this host/user cannot have one."""
    if os.geteuid() != 0:
        return None
    root = _hierarchy()
    if root is None:
        return None
    for stale in root.glob("agent-spo-*"):  # left by a trainer that was killed
        owner = stale.name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            remove(stale)
    path = root / name
    try:
        path.mkdir(exist_ok=True)
        (path / "pids.max").write_text(str(pids_max))
    except OSError:
        return None
    return path


def join_self(path: Path) -> None:
    """Move the calling process into the cgroup (call in the child before exec)."""
    (path / "cgroup.procs").write_text(str(os.getpid()))


def remove(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.rmdir()
    except OSError:
        pass  # still busy (processes exiting); the name is unique, nothing collides
