"""The docker backend, and runners that share one host work root.

No Docker engine runs on the development and CI machines, so the live tests skip with
the reason; everything around them runs: the container's security settings, the frame
demultiplexer, and the whole pool driven through a fake engine that frames a real
runner's output exactly as dockerd does.
"""

import asyncio
import collections
import os
import random
import socket
import subprocess
import threading

import pytest

from sandboxes.docker import (
    STDERR,
    STDOUT,
    ContainerSpec,
    DockerSandbox,
    FrameDemuxer,
    _DockerWorker,
    connect,
    container_kwargs,
    frame,
)
from sandboxes.jail import SandboxUnavailable, unisolated_command
from sandboxes.local import Limits, LocalSandbox


def test_container_is_locked_down():
    k = container_kwargs(ContainerSpec(memory_mb=1024, pids=128, cpus=0.5, tmp_mb=64), "w0")
    assert k["network_mode"] == "none" and k["read_only"] is True
    assert k["cap_drop"] == ["ALL"] and k["security_opt"] == ["no-new-privileges"]
    assert k["user"] == "65534:65534"
    assert k["mem_limit"] == k["memswap_limit"] == "1024m"
    assert k["pids_limit"] == 128 and k["nano_cpus"] == 500_000_000
    assert k["tmpfs"] == {"/tmp": "size=64m,mode=1777,exec"}
    assert k["stdin_open"] and not k["tty"] and k["auto_remove"]
    assert "runtime" not in k
    assert container_kwargs(ContainerSpec(runtime="runsc"), "w1")["runtime"] == "runsc"


def test_containers_of_dead_trainers_are_reaped():
    import socket as sk

    from sandboxes.docker import OWNER, reap_orphans

    class C:
        def __init__(self, owner):
            self.labels = {"agent-spo": "sandbox", "agent-spo.owner": owner}
            self.killed = False

        def kill(self):
            self.killed = True

    dead_pid = 2**22 + 12345  # above pid_max: never a live process
    mine, orphan, other_host = C(OWNER), C(f"{sk.gethostname()}:{dead_pid}"), C("elsewhere:1")

    class Client:
        class containers:  # noqa: N801 - mimics docker's client.containers
            @staticmethod
            def list(filters):
                assert filters == {"label": "agent-spo=sandbox"}
                return [mine, orphan, other_host]

    assert reap_orphans(Client()) == 1
    assert orphan.killed and not mine.killed and not other_host.killed
    assert container_kwargs(ContainerSpec(), "w")["labels"]["agent-spo.owner"] == OWNER


def test_demuxer_handles_split_and_interleaved_frames():
    stream = frame(STDOUT, b"hello ") + frame(STDERR, b"warn") + frame(STDOUT, b"world")
    d = FrameDemuxer()
    out = []
    for i in range(0, len(stream), 3):  # 3-byte reads split headers and payloads
        out += d.feed(stream[i : i + 3])
    assert out == [(STDOUT, b"hello "), (STDERR, b"warn"), (STDOUT, b"world")]
    with pytest.raises(ValueError, match="not a Docker stream frame"):
        FrameDemuxer().feed(b"\x07\x00\x00\x00\x00\x00\x00\x01x")


class FakeEngine:
    """Plays dockerd's attach stream for one 'container' running the real runner."""

    def __init__(self):
        self.ours, theirs = socket.socketpair()
        argv, env = unisolated_command()
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

        def stdin_pump():
            while data := theirs.recv(65536):
                self.proc.stdin.write(data)
                self.proc.stdin.flush()

        lock = threading.Lock()  # dockerd writes whole frames; two pumps must not interleave

        def out_pump(pipe, stream):
            rng = random.Random(stream)
            while data := pipe.read1(65536):
                while data:  # re-chunk at random sizes, as the network would
                    n = rng.randint(1, 700)
                    with lock:
                        theirs.sendall(frame(stream, data[:n]))
                    data = data[n:]

        for target, args in (
            (stdin_pump, ()),
            (out_pump, (self.proc.stdout, STDOUT)),
            (out_pump, (self.proc.stderr, STDERR)),
        ):
            threading.Thread(target=target, args=args, daemon=True).start()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class FakeEngineSandbox(DockerSandbox):
    async def _make_workers(self):
        self.engines = []
        workers = []
        for i in range(self._n):
            w = _DockerWorker(
                i, [], None, None, self._hello, stderr_tail=collections.deque(maxlen=50)
            )
            engine = FakeEngine()
            self.engines.append(engine)

            async def spawn(w=w, engine=engine):
                w._sock = engine.ours
                w._sock.setblocking(False)
                from sandboxes.docker import FrameDemuxer as Demux

                w._demux, w._stdout = Demux(), bytearray()

            w._spawn = spawn
            workers.append(w)
        return workers


def test_pool_over_the_docker_stream_protocol(tmp_path):
    async def go():
        sb = FakeEngineSandbox(workers=2, limits=Limits(timeout_s=2.0))
        # the fake 'containers' are plain processes on this host: never sweep the host,
        # and keep their work dirs out of the host's /tmp
        sb._hello["config"]["jailed"] = False
        sb._hello["config"]["limits"]["workroot"] = str(tmp_path)
        await sb.start()
        try:
            r1 = await sb.run("print('x' * 5000)\n6 * 7")
            s = await sb.open_session()
            await s.run("v = 41")
            r2 = await s.run("v + 1")
            r3 = await s.run("while True: pass", timeout_s=0.5)
            r4 = await s.run("v")
            burst = await asyncio.gather(*(sb.run(f"print({i})") for i in range(20)))
            return r1, r2, r3, r4, burst
        finally:
            await sb.close()
            for e in sb.engines:
                e.stop()

    r1, r2, r3, r4, burst = asyncio.run(go())
    assert r1.status == "ok" and r1.stdout == "x" * 5000 + "\n42\n" and r1.backend == "docker"
    assert r2.stdout == "42\n"
    assert r3.status == "timeout" and r4.stdout == "41\n"
    assert [r.status for r in burst] == ["ok"] * 20, [r.detail for r in burst]
    assert sorted(int(r.stdout) for r in burst) == list(range(20))


def test_runners_sharing_one_work_root_never_reuse_a_work_dir():
    """Two unisolated runners share one work root; a call's directory is its own.

    Each runner once numbered its call directories from 1, so one runner could remove
    the directory another's fresh executor was about to enter (a spurious 'crashed').
    """

    async def go():
        async with LocalSandbox(workers=2, isolation="none") as sb:
            root = sb._workdir
            results = await asyncio.gather(
                *(sb.run("import os\nprint(os.getcwd())") for _ in range(40))
            )
        return root, results

    root, results = asyncio.run(go())
    assert [r.status for r in results] == ["ok"] * 40, [r.exit_code for r in results]
    assert {r.worker for r in results} == {0, 1}  # both runners served calls
    cwds = [r.stdout.strip() for r in results]
    assert all(c.startswith(root + "/call-") for c in cwds), cwds[:3]
    assert len(set(cwds)) == 40  # no two calls, of either runner, shared a directory
    assert not os.path.exists(root)  # the pool's work root goes with the pool


def test_a_runner_that_shuts_down_leaves_nothing_in_its_work_root():
    async def go():
        async with LocalSandbox(workers=1, isolation="none") as sb:
            session = await sb.open_session()
            await session.run("open('kept.txt', 'w').write('x')")
            r = await sb.run("print(1)")
            for _ in range(200):  # the next spare makes its own dir, just after the reply
                full = sorted(os.listdir(sb._workdir))
                if any(n.startswith("call-") for n in full):
                    break
                await asyncio.sleep(0.01)
            await sb._workers[0].shutdown()  # returns once the runner has exited
            return r, full, sorted(os.listdir(sb._workdir))

    r, full, after = asyncio.run(go())
    assert r.status == "ok"
    assert any(n.startswith("session-") for n in full) and any(n.startswith("call-") for n in full)
    assert after == []


def _engine_or_reason():
    try:
        connect()
        return None
    except SandboxUnavailable as e:
        return str(e)


_NO_ENGINE = _engine_or_reason()


@pytest.mark.skipif(
    _NO_ENGINE is not None,
    reason=f"needs a Docker engine and the agent-spo-sandbox image: {_NO_ENGINE}",
)
def test_live_docker_backend_runs_calls_and_sessions():
    async def go():
        async with DockerSandbox(workers=1) as sb:
            r = await sb.run(
                "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), 2)"
                "\nexcept OSError as e:\n    print(type(e).__name__)"
            )
            s = await sb.open_session()
            await s.run("x = 1")
            return r, await s.run("x + 1")

    r, r2 = asyncio.run(go())
    assert r.status == "ok" and r.stdout.strip() in ("OSError", "PermissionError")
    assert r2.stdout == "2\n"


def test_missing_engine_is_a_clear_error():
    if _NO_ENGINE is None:
        pytest.skip("a Docker engine answers here; this checks the message when none does")
    with pytest.raises(SandboxUnavailable, match="no Docker engine answers"):
        asyncio.run(DockerSandbox(workers=1).start())
