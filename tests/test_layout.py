"""Package layering: imports go one way down, and no module imports a cycle.

    agent_spo.cli ──▶ agent_spo.bench ──▶ agent_spo (core) ──▶ sandboxes ──▶ (stdlib)
                                                         └──▶ tools ──────▶ (stdlib, sympy)

Checked two ways: importing every module of a package in a fresh interpreter must not
load a package it may not use (what runs), and no module's import statements, read from
the source, may name one (what is written, including imports inside functions).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> packages (top-level names or dotted prefixes) its modules may not import
FORBIDDEN = {
    "tools": ("torch", "agent_spo", "sandboxes"),
    "sandboxes": ("torch", "agent_spo"),
    "agent_spo": ("agent_spo.cli", "agent_spo.bench"),
    "agent_spo.bench": ("agent_spo.cli",),
    "agent_spo.algo": ("agent_spo.config", "yaml", "httpx", "transformers", "torch.distributed"),
}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module name an import statement anywhere in ``path`` names."""
    names: set[str] = set()
    pkg = list(path.relative_to(ROOT).parts[:-1])  # the package a relative import starts at
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _banned(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_names_a_forbidden_package(package):
    # a package may import its own subpackage that another row forbids to others
    allowed = (package,) if package != "agent_spo" else ()
    bad = []
    for path in _modules(package):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if package == "agent_spo" and module.startswith(("agent_spo.cli", "agent_spo.bench")):
            continue  # the edges themselves; their own rows are checked separately
        for name in _imports(path):
            if _banned(name, FORBIDDEN[package]) and not _banned(name, allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["tools", "sandboxes"])
def test_package_imports_without_torch_or_trainer(package):
    code = (
        f"import sys, {package}, pkgutil, importlib\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'agent_spo', 'sandboxes', 'tools') and m.split('.')[0] != "
        f"'{package}')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{package} pulled in: {out.stdout.strip()}"


def test_algo_core_has_no_io_or_config_imports():
    code = (
        "import sys, agent_spo.algo\n"
        "bad = sorted(m for m in sys.modules if m in ('agent_spo.config', 'yaml', 'httpx',"
        " 'transformers', 'agent_spo.cli'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_import_cycles_between_modules():
    """Module-level imports (those that run at import time) form no cycle."""
    graph: dict[str, set[str]] = {}
    known = set()
    for package in ("agent_spo", "tools", "sandboxes"):
        for path in _modules(package):
            parts = path.relative_to(ROOT).with_suffix("").parts
            known.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for package in ("agent_spo", "tools", "sandboxes"):
        for path in _modules(package):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            deps = set()
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:  # top level only: imports inside functions run late
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                deps.update(t for t in targets if t in known and t != name)
            graph[name] = deps
    cycles = []
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    # a package's __init__ importing its own submodules, which import the package's
    # siblings through it, is how Python packages are built, not a cycle between modules
    real = [c for c in cycles if not _package_self_cycle(c)]
    assert not real, "\n".join(real)


def _package_self_cycle(cycle: str) -> bool:
    nodes = cycle.split(" -> ")
    return any(all(m == n or m.startswith(n + ".") for m in nodes) for n in nodes)
