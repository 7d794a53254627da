"""The adversarial cases every backend must survive (notes/sandbox.md §7), one test each.

Each test runs hostile code in the real jailed pool and checks the clean outcome: a
typed status, the worker still healthy, and nothing of the call left running.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PROJECT = str(Path(__file__).resolve().parents[2])


def healthy(sandbox):
    """The pool still answers, and no process of earlier calls is left in any jail."""
    r = sandbox.run("print('alive')")
    assert r.status == "ok" and r.stdout == "alive\n", r
    assert sandbox.strays() == []


def run(sandbox, code, **kw):
    return sandbox.run(textwrap.dedent(code), **kw)


# ---------------------------------------------------------------------------- filesystem
def test_01_secrets_and_project_tree_are_not_visible(sandbox):
    r = run(
        sandbox,
        f"""
        import os
        out = {{}}
        for p in ['/etc/shadow', '/etc/passwd', os.path.expanduser('~/.ssh/id_rsa'),
                  '/root/.bashrc', '{PROJECT}/pyproject.toml', '{PROJECT}/README.md']:
            try:
                open(p).read(); out[p] = 'LEAKED'
            except OSError as e:
                out[p] = type(e).__name__
        print(out)
        """,
    )
    assert r.status == "ok" and "LEAKED" not in r.stdout, r.stdout


def test_02_root_has_only_the_minimal_layout(sandbox):
    # "/" itself is not listable (that would show other calls' work dirs under /tmp)
    r = run(sandbox, "import os\nos.listdir('/')")
    assert r.status == "error" and r.exc_type == "PermissionError", r
    names = ["home", "var", "opt", "mnt", "boot", "srv", "run", "media", "snap", "data"]
    r = run(sandbox, f"import os; print([n for n in {names!r} if os.path.exists('/' + n)])")
    assert r.stdout.strip() == "[]", r.stdout
    r = run(sandbox, "import os; print(sorted(os.listdir('/etc')))")
    assert r.stdout.strip() == "['ld.so.cache']"
    r = run(sandbox, "import os; print(sorted(os.listdir('/sbx')))")
    assert r.stdout.strip() == "['sandboxes', 'tools']"


def test_03_writes_outside_the_work_dir_are_denied(sandbox):
    r = run(
        sandbox,
        """
        import os
        out = {}
        for p in ['/usr/evil', '/sbx/sandboxes/evil.py', '/tmp/evil', '/etc/evil', '../evil']:
            try:
                open(p, 'w').write('x'); out[p] = 'WROTE'
            except OSError as e:
                out[p] = type(e).__name__
        open('mine.txt', 'w').write('ok')
        out['own'] = open('mine.txt').read()
        print(out)
        """,
    )
    assert r.status == "ok" and "WROTE" not in r.stdout and "'own': 'ok'" in r.stdout, r.stdout


def test_04_big_files_and_a_full_tmpfs_fail_fast(sandbox):
    t0 = time.monotonic()
    r = run(
        sandbox,
        """
        import errno
        try:
            with open('big', 'wb') as f:
                for _ in range(1024):
                    f.write(b'0' * (1 << 20))
        except OSError as e:
            print('big', errno.errorcode[e.errno])
        n = 0
        try:
            while True:
                with open(f'f{n}', 'wb') as f:
                    f.write(b'0' * (60 << 20))
                n += 1
        except OSError as e:
            print('fill', errno.errorcode[e.errno])
        """,
        timeout_s=10,
    )
    assert r.status == "ok", r
    assert "big EFBIG" in r.stdout
    assert "fill ENOSPC" in r.stdout or "fill EFBIG" in r.stdout
    assert time.monotonic() - t0 < 8
    healthy(sandbox)


def test_05_files_do_not_leak_between_calls(sandbox):
    r1 = run(sandbox, "import os; open('secret.txt','w').write('s1'); print(os.getcwd())")
    r2 = run(sandbox, f"import os; print(os.listdir('.'), os.path.exists({r1.stdout.strip()!r}))")
    assert r2.stdout.strip() == "[] False", r2.stdout
    # other calls' and sessions' work dirs are neither listable nor readable
    s = sandbox.session()
    wd = s.run("import os\nopen('answer.txt', 'w').write('42')\nos.getcwd()").stdout.strip()
    r3 = run(
        sandbox,
        f"""
        import os
        out = []
        for p in ['/tmp', {wd} + '/answer.txt', {wd}]:
            try:
                open(p).read() if p.endswith('.txt') else os.listdir(p); out.append('LEAKED')
            except OSError as e:
                out.append(type(e).__name__)
        print(out)
        """,
    )
    s.close()
    assert "LEAKED" not in r3.stdout and r3.status == "ok", r3


def test_06_symlink_and_traversal_tricks_stay_denied(sandbox):
    r = run(
        sandbox,
        """
        import os
        os.symlink('/etc', 'etc_link')
        os.symlink('/sbx/sandboxes/runner.py', 'runner_link')
        out = []
        for p in ['etc_link/passwd', '../../etc/shadow']:
            try:
                open(p).read(); out.append('LEAKED')
            except OSError as e:
                out.append(type(e).__name__)
        try:
            open('runner_link', 'a').write('#'); out.append('WROTE')
        except OSError as e:
            out.append(type(e).__name__)
        print(out)
        """,
    )
    assert r.status == "ok" and "LEAKED" not in r.stdout and "WROTE" not in r.stdout, r


# ------------------------------------------------------------------------------ network
def test_07_tcp_and_dns_fail_fast(sandbox):
    t0 = time.monotonic()
    r = run(
        sandbox,
        """
        import socket
        out = []
        for host, port in [('127.0.0.1', 22), ('8.8.8.8', 53), ('10.0.0.1', 80)]:
            try:
                socket.create_connection((host, port), timeout=5); out.append('CONNECTED')
            except OSError as e:
                out.append(type(e).__name__)
        try:
            socket.getaddrinfo('pypi.org', 443); out.append('RESOLVED')
        except OSError as e:
            out.append(type(e).__name__)
        print(out)
        """,
    )
    assert r.status == "ok" and "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout, r
    assert time.monotonic() - t0 < 2.0


def test_08_udp_raw_netlink_and_packet_sockets_fail(sandbox):
    r = run(
        sandbox,
        """
        import socket
        out = []
        for fam, typ, proto in [(socket.AF_INET, socket.SOCK_DGRAM, 0),
                                (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                                (socket.AF_NETLINK, socket.SOCK_RAW, 0),
                                (socket.AF_PACKET, socket.SOCK_RAW, 0),
                                (socket.AF_INET6, socket.SOCK_STREAM, 0)]:
            try:
                s = socket.socket(fam, typ, proto)
                s.sendto(b'x', ('8.8.8.8', 53)); out.append('SENT')
            except OSError as e:
                out.append(type(e).__name__)
        print(out)
        """,
    )
    assert r.status == "ok" and "SENT" not in r.stdout, r.stdout


def test_09_host_unix_sockets_are_unreachable(sandbox):
    r = run(
        sandbox,
        """
        import socket
        out = []
        for addr in ['\\0/tmp/.X11-unix/X0', '\\0dbus-session', '/var/run/docker.sock',
                     '/run/systemd/private']:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(addr); out.append('CONNECTED')
            except OSError as e:
                out.append(type(e).__name__)
        print(out)
        """,
    )
    assert r.status == "ok" and "CONNECTED" not in r.stdout, r.stdout


# ------------------------------------------------------------------- processes and parent
@pytest.mark.parametrize(
    "attack", ["os.kill(os.getppid(), 9)", "os.kill(-1, 9)", "os.killpg(0, 9)", "os.kill(1, 9)"]
)
def test_10_killing_the_parent_or_everyone_does_not_break_the_pool(sandbox, attack):
    r = run(
        sandbox, f"import os\ntry:\n    {attack}\nexcept OSError as e:\n    print(type(e).__name__)"
    )
    assert r.status in ("ok", "crashed", "error"), r
    healthy(sandbox)


def test_11_the_parent_cannot_be_traced_or_read(sandbox):
    r = run(
        sandbox,
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        ppid = os.getppid()
        out = [libc.ptrace(16, ppid, 0, 0), ctypes.get_errno()]  # PTRACE_ATTACH
        for p in [f'/proc/{ppid}/mem', f'/proc/{ppid}/environ', '/proc/1/environ']:
            try:
                open(p, 'rb').read(16); out.append('LEAKED')
            except OSError as e:
                out.append(type(e).__name__)
        print(out)
        """,
    )
    assert r.status == "ok" and "LEAKED" not in r.stdout and r.stdout.startswith("[-1,"), r.stdout


def test_12_namespace_mount_and_kernel_interfaces_are_refused(sandbox):
    r = run(
        sandbox,
        """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        calls = {
            'unshare_user': lambda: libc.unshare(0x10000000),
            'unshare_net': lambda: libc.unshare(0x40000000),
            'mount': lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),
            'chroot': lambda: libc.chroot(b'/tmp'),
            'setns': lambda: libc.setns(0, 0),
            'keyctl': lambda: libc.syscall(250, 0, 0, 0, 0),
            'bpf': lambda: libc.syscall(321, 0, 0, 0),
            'io_uring_setup': lambda: libc.syscall(425, 8, 0),
            'perf_event_open': lambda: libc.syscall(298, 0, 0, -1, -1, 0),
        }
        out = {}
        for name, fn in calls.items():
            rc = fn()
            out[name] = 'ALLOWED' if rc >= 0 else errno.errorcode.get(ctypes.get_errno())
        print(out)
        """,
    )
    assert r.status == "ok" and "ALLOWED" not in r.stdout, r.stdout


def test_13_only_std_fds_are_inherited_and_protocol_cannot_be_injected(sandbox):
    r = run(
        sandbox,
        """
        import os, json
        fds = {}
        for f in os.listdir('/proc/self/fd'):
            try:
                fds[int(f)] = os.readlink(f'/proc/self/fd/{f}')
            except OSError:
                pass  # listdir's own fd, already closed
        print(json.dumps(fds))
        """,
    )
    fds = {int(k): v for k, v in json.loads(r.stdout).items()}
    extra = {k: v for k, v in fds.items() if k > 2}
    # beyond 0/1/2: at most the status pipe and a reserved /dev/null
    assert len(extra) <= 2 and all(
        v == "/dev/null" or v.startswith("pipe:") for v in extra.values()
    ), fds
    fake = b'\x00\x00\x00\x10{"status":"ok"}'
    r = run(
        sandbox,
        f"""
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, {fake!r})
            except OSError:
                pass
        print('done')
        """,
    )
    assert r.status == "ok" and r.stdout == "done\n", r
    healthy(sandbox)


def test_14_tiocsti_is_denied(sandbox):
    r = run(
        sandbox,
        """
        import fcntl, os, termios
        try:
            fd = os.open('/dev/tty', os.O_RDWR)
        except OSError as e:
            print('no tty', type(e).__name__)
        else:
            try:
                fcntl.ioctl(fd, termios.TIOCSTI, b'x'); print('INJECTED')
            except OSError as e:
                print(type(e).__name__)
        """,
    )
    assert r.status == "ok" and "INJECTED" not in r.stdout, r


# ------------------------------------------------------------------------------ resources
def test_15_fork_bombs_are_bounded_and_cleaned_up(sandbox):
    r = run(
        sandbox,
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        timeout_s=2,
    )
    assert r.status in ("timeout", "crashed"), r
    r = run(
        sandbox,
        """
        import subprocess
        procs = []
        while True:
            try:
                procs.append(subprocess.Popen(['sleep', '100']))
            except OSError:
                pass
        """,
        timeout_s=2,
    )
    assert r.status in ("timeout", "error"), r
    healthy(sandbox)


def test_16_thread_bombs_are_bounded(sandbox):
    r = run(
        sandbox,
        """
        import threading, time
        n = 0
        try:
            for _ in range(100000):
                threading.Thread(target=time.sleep, args=(10,), daemon=True).start()
                n += 1
        except RuntimeError as e:
            print('stopped at', n, e)
        """,
        timeout_s=5,
    )
    assert r.status in ("ok", "memory", "error") and "stopped at" in r.stdout, r
    healthy(sandbox)


@pytest.mark.parametrize("code", [
    "x = bytearray(10 * 2**30)",
    "x = []\nwhile True:\n    x.append(bytearray(2**24))",
    "import numpy\nx = numpy.zeros((2**20, 2**12))",
    "import mmap\nm = mmap.mmap(-1, 10 * 2**30)",
])  # fmt: skip
def test_17_memory_exhaustion_is_a_memory_status(sandbox, code):
    t0 = time.monotonic()
    r = run(sandbox, code, timeout_s=10)
    assert r.status == "memory" or (r.status == "error" and r.exc_type == "OSError"), r
    assert time.monotonic() - t0 < 8
    healthy(sandbox)


def test_17b_shared_memory_is_not_writable(sandbox):
    r = run(sandbox, "open('/dev/shm/big', 'wb').write(b'0' * 2**20)")
    assert r.status == "error" and r.exc_type in ("PermissionError", "FileNotFoundError"), r


@pytest.mark.parametrize("code", [
    "while True: pass",
    "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
    "import time\ntime.sleep(1e6)",
])  # fmt: skip
def test_18_runaway_code_times_out_at_the_deadline(sandbox, code):
    r = run(sandbox, code, timeout_s=1.5)
    assert r.status == "timeout", r
    # killed at the deadline, not long after (generous upper bound for a loaded CI box)
    assert 1.4 < r.wall_s < 3.5, r.wall_s
    healthy(sandbox)


def test_18b_input_does_not_block(sandbox):
    r = run(sandbox, "input('? ')", timeout_s=2)
    assert r.status == "error" and r.exc_type == "EOFError" and r.wall_s < 1.0, r


def test_19_multiprocessing_cpu_burn_is_killed_whole(sandbox):
    r = run(
        sandbox,
        """
        import multiprocessing as mp
        def burn(_):
            while True:
                pass
        with mp.Pool(8) as pool:
            pool.map(burn, range(8))
        """,
        timeout_s=2,
    )
    assert r.status in ("timeout", "error"), r
    healthy(sandbox)


def test_20_open_file_flood_hits_emfile(sandbox):
    r = run(
        sandbox,
        """
        import errno
        fs = []
        try:
            for i in range(100000):
                fs.append(open('/dev/null'))
        except OSError as e:
            print(errno.errorcode[e.errno], len(fs) < 1000)
        """,
    )
    assert r.status == "ok" and r.stdout.strip() == "EMFILE True", r


def test_21_rlimits_cannot_be_raised(sandbox):
    r = run(
        sandbox,
        """
        import resource
        out = []
        for res in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE,
                    resource.RLIMIT_CPU):
            soft, hard = resource.getrlimit(res)
            try:
                resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                out.append('RAISED')
            except (ValueError, OSError) as e:
                out.append(type(e).__name__)
        print(out)
        """,
    )
    assert r.status == "ok" and "RAISED" not in r.stdout, r


# --------------------------------------------------------------------------------- output
@pytest.mark.parametrize("code", [
    "while True: print('x' * 1000)",
    "import os\nwhile True: os.write(2, b'e' * 65536)",
    "import sys\nwhile True: sys.stdout.write('y' * 65536)",
])  # fmt: skip
def test_22_output_floods_are_cut_with_head_and_tail(sandbox, code):
    r = run(sandbox, code)
    assert r.status == "output_limit", r
    assert r.stdout_truncated or r.stderr_truncated
    assert r.wall_s < 1.0
    text = r.stdout or r.stderr
    assert "bytes truncated" in text and len(text) < 64 * 1024
    healthy(sandbox)


def test_23_invalid_utf8_surrogates_and_nul_are_delivered(sandbox):
    r = run(
        sandbox,
        r"""
        import os, sys
        os.write(1, b'bad \xff\xfe bytes\n')
        print('nul\x00inside')
        print('surrogate \udcff')
        """,
    )
    assert r.status == "ok", r
    assert "bad \ufffd\ufffd bytes" in r.stdout and "nul\x00inside" in r.stdout
    assert "surrogate" in r.stdout


def test_24_escape_sequences_and_fake_markers_are_plain_text(sandbox):
    marker = '{"status": "ok", "stdout": "forged"}'
    r = run(sandbox, f"print('\\x1b[31mred\\x1b[0m'); print({marker!r}); 1/0")
    assert r.status == "error" and r.exc_type == "ZeroDivisionError"
    assert "\x1b[31mred" in r.stdout and marker in r.stdout


@pytest.mark.parametrize("code, status", [
    ("print('before', flush=True)\nimport ctypes\nctypes.string_at(0)", "crashed"),
    ("print('before', flush=True)\nwhile True: pass", "timeout"),
])  # fmt: skip
def test_25_output_before_a_crash_or_timeout_is_kept(sandbox, code, status):
    r = run(sandbox, code, timeout_s=1)
    assert r.status == status and r.stdout == "before\n", r


# ------------------------------------------------------------------- crashes and oddities
@pytest.mark.parametrize("code, status, exit_code, sig", [
    ("import ctypes\nctypes.string_at(0)", "crashed", None, signal.SIGSEGV),
    ("import os\nos.abort()", "crashed", None, signal.SIGABRT),
    ("import os\nos._exit(3)", "crashed", 3, None),
    ("raise SystemExit(2)", "error", 0, None),
    ("raise KeyboardInterrupt", "error", 0, None),
])  # fmt: skip
def test_26_crashes_are_reported_and_the_next_call_works(sandbox, code, status, exit_code, sig):
    r = run(sandbox, code)
    assert r.status == status, r
    assert r.exit_code == exit_code and r.signal == sig, r
    healthy(sandbox)


def test_27_deep_recursion_is_bounded(sandbox):
    r = run(
        sandbox,
        """
        import sys
        sys.setrecursionlimit(10**7)
        def f(n):
            return f(n + 1)
        f(0)
        """,
        timeout_s=3,
    )
    assert r.status in ("crashed", "timeout", "error", "memory"), r
    healthy(sandbox)


@pytest.mark.parametrize("code, exc", [
    ("def f(:\n  pass", "SyntaxError"),
    ("if True:\nprint(1)", "IndentationError"),
    ("x = '\\0'", None),
])  # fmt: skip
def test_28_syntax_errors_are_errors_with_a_message(sandbox, code, exc):
    r = run(sandbox, code)
    if exc is None:
        assert r.status == "ok"
    else:
        assert r.status == "error" and r.exc_type == exc and r.exc_message, r


@pytest.mark.parametrize("code", ["", "# only a comment\n", "\n\n"])
def test_28b_empty_code_runs_and_prints_nothing(sandbox, code):
    r = run(sandbox, code)
    assert r.status == "ok" and r.stdout == "" and r.stderr == ""


def test_29_trailing_expression_echo_and_stream_order(sandbox):
    r = run(
        sandbox, "import sys\nprint('a'); print('e1', file=sys.stderr); print('b')\nx = 6\nx * 7"
    )
    assert r.stdout == "a\nb\n42\n" and r.stderr == "e1\n"
    assert run(sandbox, "None").stdout == ""
    assert run(sandbox, "'s'").stdout == "'s'\n"


# ------------------------------------------------------------------------------ leftovers
def test_30_background_processes_and_daemons_are_killed_after_the_call(sandbox):
    r = run(
        sandbox,
        """
        import os, subprocess
        subprocess.Popen(['sleep', '300'], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                import time
                time.sleep(300)
            os._exit(0)
        print('spawned')
        """,
    )
    assert r.status == "ok" and r.stdout == "spawned\n"
    assert sandbox.strays() == []


def test_31_zombies_are_reaped(sandbox):
    r = run(
        sandbox,
        """
        import os
        for _ in range(20):
            if os.fork() == 0:
                os._exit(0)
        print('made zombies')
        """,
    )
    assert r.status == "ok"
    assert sandbox.strays() == []


@pytest.mark.slow
def test_32_many_calls_leave_the_pool_flat(sandbox):
    for _ in range(50):  # settle spares and caches
        sandbox.run("print(1)")
    before = sandbox.footprint()
    s = sandbox.session()
    for i in range(600):
        if i % 2:
            assert s.run("y = 1").status == "ok"
        else:
            assert sandbox.run("open('f','w').write('x' * 1000); print(2**100)").status == "ok"
    s.close()
    after = sandbox.footprint()
    assert sandbox.strays() == []
    assert after["processes"] <= before["processes"]
    assert after["fds"] <= before["fds"]
    assert after["rss_mb"] < before["rss_mb"] * 1.2 + 10, (before, after)


# ----------------------------------------------------------------------- state (sessions)
def test_33_session_state_persists(sandbox):
    s = sandbox.session()
    assert s.run("import math\ndef f(x):\n    return x + 1\nv = 41").status == "ok"
    assert s.run("f(v), math.pi > 3").stdout == "(42, True)\n"
    s.close()


@pytest.mark.parametrize("bad", [
    "v = 999\nwhile True: pass",
    "v = 999\nimport ctypes\nctypes.string_at(0)",
    "v = 999\nprint('x' * 10**7)",
    "v = 999\nimport os\nos._exit(1)",
])  # fmt: skip
def test_34_a_killed_call_leaves_the_previous_state(sandbox, bad):
    s = sandbox.session()
    s.run("v = 1")
    r = s.run(bad, timeout_s=1)
    assert r.status in ("timeout", "crashed", "output_limit"), r
    assert s.run("v").stdout == "1\n"
    s.close()


def test_34b_an_exception_keeps_the_changes_made_before_it(sandbox):
    s = sandbox.session()
    s.run("v = 1")
    assert s.run("v = 2\n1/0").status == "error"
    assert s.run("v").stdout == "2\n"  # like a notebook
    s.close()


def test_35_sessions_are_isolated_from_each_other(make_sandbox):
    sandbox = make_sandbox(workers=1)  # both sessions in one jail: the hard case
    a, b = sandbox.session(), sandbox.session()
    a.run("secret = 'A'\nopen('a.txt', 'w').write('A')\nimport os\nwd = os.getcwd()")
    wd = a.run("wd").stdout.strip().strip("'")
    r = b.run(
        textwrap.dedent(f"""
        print('secret' in dir())
        for op in ('read', 'write', 'list'):
            try:
                if op == 'read':
                    open({wd!r} + '/a.txt').read()
                elif op == 'write':
                    open({wd!r} + '/b.txt', 'w').write('B')
                else:
                    __import__('os').listdir({wd!r})
                print(op, 'LEAKED')
            except OSError as e:
                print(op, type(e).__name__)
        """)
    )
    # (a path's existence is visible to stat(); its name is a random id nobody can list)
    assert (
        r.stdout == "False\nread PermissionError\nwrite PermissionError\nlist PermissionError\n"
    ), r
    a.close()
    b.close()


def test_36_closing_a_session_frees_its_processes(sandbox):
    before = sandbox.footprint()["processes"]
    n0 = sandbox.census()["sessions"]
    sessions = [sandbox.session() for _ in range(4)]
    for s in sessions:
        s.run("import subprocess\nx = 1")
    assert sandbox.census()["sessions"] == n0 + 4
    # each session: its holder and (normally) the standing backup of its state
    assert sandbox.footprint()["processes"] >= before + 4
    for s in sessions:
        s.close()
    healthy(sandbox)
    assert sandbox.census()["sessions"] == n0
    assert sandbox.footprint()["processes"] <= before


# -------------------------------------------------------------- concurrency and robustness
def test_36b_forgotten_sessions_are_closed_after_their_ttl(make_sandbox):
    import asyncio

    sb = make_sandbox(workers=1, session_ttl_s=0.4)
    forgotten = sb.session()
    forgotten.run("x = 1")
    kept = sb.session()
    for _ in range(8):  # 1.6 s: 'kept' stays in use, 'forgotten' sits idle
        kept.run("x = 2")
        sb.loop.run_until_complete(asyncio.sleep(0.2))
    assert sb.census()["sessions"] == 1
    r = forgotten.run("x")
    assert r.status == "session_lost" and "TTL" in r.detail
    assert kept.run("x").stdout == "2\n"


def test_37_a_burst_completes_and_a_full_queue_says_so(make_sandbox):
    sb = make_sandbox(workers=2, queue_timeout_s=0.5)
    if True:
        results = sb.gather([sb.sb.run(f"print({i})") for i in range(40)])
        assert [r.status for r in results] == ["ok"] * 40
        assert sorted(int(r.stdout) for r in results) == list(range(40))
        slow = sb.gather([sb.sb.run("import time\ntime.sleep(1.2)") for _ in range(4)])
        statuses = sorted(r.status for r in slow)
        assert statuses == ["ok", "ok", "queue_timeout", "queue_timeout"], statuses
        assert all(r.wall_s < 1.0 for r in slow if r.status == "queue_timeout")


def test_38_a_worker_killed_mid_call_is_reported_and_replaced(make_sandbox):
    sb = make_sandbox(workers=1)
    if True:
        session = sb.session()
        session.run("x = 1")
        worker = sb.sb._workers[0]

        async def kill_soon():
            import asyncio

            await asyncio.sleep(0.3)
            os.killpg(worker.proc.pid, signal.SIGKILL)

        r, _ = sb.gather([sb.sb.run("import time\ntime.sleep(5)"), kill_soon()])
        assert r.status == "sandbox_error" and r.infrastructure_failure, r
        assert sb.run("print('healed')").stdout == "healed\n"
        lost = session.run("x")
        assert lost.status == "session_lost", lost
        assert worker.restarts == 1


def test_39_no_sandbox_process_outlives_the_trainer():
    script = textwrap.dedent("""
        import asyncio, os, sys
        from sandboxes.local import LocalSandbox
        async def main():
            sb = await LocalSandbox(workers=2).start()
            s = await sb.open_session()
            await s.run("import subprocess; p = subprocess.Popen(['sleep', '300'])")
            print(' '.join(str(w.proc.pid) for w in sb._workers), flush=True)
            await asyncio.sleep(300)
        asyncio.run(main())
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not alive, f"jails still running: {alive}"


def test_41_the_same_snippet_gives_the_same_output(sandbox):
    code = "print({'alpha', 'beta', 'gamma', 'delta'}, hash('agent-spo'), sorted(dir())[:3])"
    outs = {sandbox.run(code).stdout for _ in range(6)}  # spread over both workers
    assert len(outs) == 1, outs


# ------------------------------------------------------ attacks on the runner's own channels
def test_a_forged_status_record_is_the_cells_own_crash(make_sandbox):
    sb = make_sandbox(workers=1)
    other = sb.session()
    other.run("keep = 'me'")
    forged = b'\x1e{"ok": false, "traceback": {"a": 1}, "exc_type": ["x"]}'
    for record in (forged, b"\x1e[]", b"\x1e" + b"[" * 100000):
        r = sb.run(
            textwrap.dedent(f"""
            import os
            for fd in range(3, 64):
                try:
                    os.write(fd, {record!r})
                    os.dup2(os.open('/dev/null', os.O_WRONLY), fd)  # lose the real record
                except OSError:
                    pass
            """)
        )
        assert r.status == "crashed" and not r.infrastructure_failure, r
    assert other.run("keep").stdout == "'me'\n"  # the worker never restarted
    assert sb.sb._workers[0].restarts == 0


def test_a_forged_backup_message_cannot_aim_the_zygote(make_sandbox):
    sb = make_sandbox(workers=1, limits=__import__("sandboxes").Limits(timeout_s=1.0))
    victim = sb.session()
    victim.run("v = 'safe'")
    attacker = sb.session()
    r = attacker.run(
        textwrap.dedent("""
        import gc, json, os, signal, socket, struct
        socks = [o for o in gc.get_objects() if isinstance(o, socket.socket)]
        for s in socks:
            for pid in (os.getppid(), 1):
                body = json.dumps({"op": "ready", "pid": pid}).encode()
                try:
                    s.send(struct.pack(">I", len(body)) + body)
                except OSError:
                    pass
        while True:
            pass
        """)
    )
    assert r.status == "timeout", r
    attacker.close()
    assert victim.run("v").stdout == "'safe'\n"
    assert sb.sb._workers[0].restarts == 0
    healthy(sb)


def test_long_non_ascii_exceptions_are_errors(sandbox):
    r = run(sandbox, "raise ValueError('é' * 10000)")
    assert r.status == "error" and r.exc_type == "ValueError", r


def test_without_preloads_calls_still_work(make_sandbox):
    sb = make_sandbox(workers=1, preload=(), packages=())
    assert sb.run("print(6 * 7)").stdout == "42\n"
    s = sb.session()
    s.run("x = 1")
    assert s.run("x + 1").stdout == "2\n"


def test_a_cancelled_call_does_not_desynchronise_the_worker(make_sandbox):
    import asyncio

    sb = make_sandbox(workers=1)
    session = sb.session()
    session.run("x = 1")

    async def cancel_one():
        try:
            await asyncio.wait_for(sb.sb.run("import time\ntime.sleep(1)"), 0.2)
        except TimeoutError:
            pass

    sb.loop.run_until_complete(cancel_one())
    assert sb.run("print('next')").stdout == "next\n"
    assert sb.run("print('again')").stdout == "again\n"
    assert session.run("x").status == "session_lost"  # said plainly, not a wrong answer
