"""One owner per run directory: an exclusive lock held for the life of the training process.

Two trainers writing one run directory interleave their metrics, mix their episodes and
overwrite each other's checkpoints. :func:`lock_run_dir` takes an exclusive ``flock`` on
``RUN_DIR/.lock`` (creating the directory), so a second trainer (a repeated command, a
``--resume`` while the run is alive, two fresh runs a second apart) fails at once with
:class:`RunLocked`, naming the holder's pid and command. The kernel drops the lock when
its process dies, however it dies (SIGKILL included), so a crashed run never leaves a
stale lock behind. Everything that decides "does a run exist here?" runs under the lock,
which makes that check and the files that answer it one atomic step.

The lock belongs to the open file, which a bare ``fork()`` would share with the child
(an engine process, a worker), so a child could keep holding it after the trainer was
killed. Children forked while a lock is held close their copy at once
(``os.register_at_fork``); a file system that cannot lock at all is an error
(:class:`RunDirUnlockable`). ``flock`` is local to one machine: on a network file
system shared by several hosts it may not exclude a process on another host.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"

_held: set[int] = set()  # this process's lock fds, closed in forked children


def _close_in_child() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirUnlockable(RuntimeError):
    """The run directory's file system cannot take the lock."""


class RunLocked(RuntimeError):
    """Another live process owns the run directory."""

    def __init__(self, run_dir: Path, holder: dict) -> None:
        self.run_dir, self.holder = run_dir, holder
        pid = holder.get("pid", "unknown")
        who = f"pid {pid}"
        if isinstance(pid, int) and holder.get("host") == socket.gethostname() and not _alive(pid):
            who += " (gone: a process it started still holds the lock; stop that process)"
        if holder.get("host") and holder.get("host") != socket.gethostname():
            who += f" on {holder['host']}"
        if holder.get("command"):
            who += f" ({holder['command']})"
        since = holder.get("since")
        when = f", since {since}" if since else ""
        super().__init__(
            f"{run_dir} is in use by another trainer: {who}{when}. Wait for it to finish or "
            "stop it, or give this run another name (run.name=...)"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(run_dir: Path) -> dict:
    """What the lock file says about its holder ({} when unreadable or not yet written)."""
    try:
        holder = json.loads((run_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[Path]:
    """Own ``run_dir`` until the block exits; raises :class:`RunLocked` at once if another
    process owns it. Creates the directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(run_dir, read_holder(run_dir)) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: some network and FUSE file systems
            raise RunDirUnlockable(
                f"cannot lock {run_dir / LOCK_NAME} ({e.strerror or e}); put run.output_dir "
                "on a local file system"
            ) from None
        _held.add(fd)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield run_dir
    finally:
        _held.discard(fd)
        os.close(fd)  # releases the lock; the file stays (its holder line is stale, harmless)


def check_unlocked(run_dir: Path) -> None:
    """Raise RunLocked if a live process owns ``run_dir`` now (creates nothing)."""
    if not (run_dir / LOCK_NAME).exists():
        return
    with lock_run_dir(run_dir):
        pass


__all__ = [
    "LOCK_NAME",
    "RunDirUnlockable",
    "RunLocked",
    "check_unlocked",
    "lock_run_dir",
    "read_holder",
]
