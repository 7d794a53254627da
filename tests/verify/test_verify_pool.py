"""The worker pool: hard wall clock, kill and restart, no surviving processes."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent_spo.verify import VerifierPool

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[0] != "Z"  # a zombie is dead
    except (OSError, IndexError):  # gone between open and read: ProcessLookupError
        return False


def _wait_dead(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def test_check_in_worker(pool):
    v = pool.check("\\frac{1}{2}", "so \\boxed{0.5}")
    assert v.correct and v.status == "correct" and v.elapsed_s > 0


def test_stuck_worker_is_killed_and_replaced():
    with VerifierPool(workers=1, timeout_s=0.5) as p:
        (before,) = p.pids()
        start = time.monotonic()
        v = p._call(("sleep", 60), None)  # a worker stuck for a minute
        took = time.monotonic() - start
        assert v.status == "timeout" and not v.correct and v.reward is None
        assert "killed" in v.reason and 0.5 <= took < 2.0
        assert _wait_dead([before]) == []
        (after,) = p.pids()
        assert after != before and p.timeouts == 1 and p.restarts == 1
        assert p.check("3", "\\boxed{3}").correct  # the replacement works


def test_a_worker_that_died_while_idle_is_replaced_without_losing_a_check():
    with VerifierPool(workers=1, timeout_s=2.0) as p:
        (pid,) = p.pids()
        os.kill(pid, signal.SIGKILL)
        _wait_dead([pid])
        assert p.check("3", "\\boxed{3}").correct
        assert p.restarts == 1 and p.pids() != [pid]


def test_an_input_that_kills_two_workers_is_a_failed_check_not_a_hang():
    with VerifierPool(workers=1, timeout_s=2.0) as p:
        v = p._call(("exit",), None)  # every worker that receives it dies
        assert v.status == "timeout" and v.reward is None
        assert "died (exit code" in v.reason and p.restarts == 2
        assert p.check("3", "\\boxed{3}").correct  # the pool still works


def test_check_many_keeps_order(pool):
    pairs = [(str(i), f"\\boxed{{{i if i % 3 else i + 1}}}") for i in range(40)]
    verdicts = pool.check_many(pairs)
    assert [v.correct for v in verdicts] == [i % 3 != 0 for i in range(40)]


def test_acheck(pool):
    async def run():
        return await asyncio.gather(*(pool.acheck("2", f"\\boxed{{{k}}}") for k in range(6)))

    verdicts = asyncio.run(run())
    assert [v.correct for v in verdicts] == [k == 2 for k in range(6)]


def test_close_stops_every_worker():
    p = VerifierPool(workers=2)
    pids = p.pids()
    assert all(_alive(x) for x in pids)
    p.close()
    p.close()  # idempotent
    assert _wait_dead(pids) == []
    with pytest.raises(RuntimeError):
        p.check("1", "1")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_workers_die_with_their_owner():
    script = textwrap.dedent(
        """
        import os, signal
        from agent_spo.verify import VerifierPool
        if __name__ == "__main__":
            pool = VerifierPool(workers=2)
            print(*pool.pids(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    pids = [int(x) for x in proc.stdout.split()]
    assert len(pids) == 2, proc.stderr
    assert _wait_dead(pids) == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        VerifierPool(workers=0)
    with pytest.raises(ValueError):
        VerifierPool(timeout_s=0)
