"""Tool references: how a config, the CLI and `sandbox serve` name the tools to offer.

A reference is one of:

* a built-in tool's name: ``python``, ``factor``, ...;
* a file of tools: ``my_tools.py`` (every ``@tool`` defined in it) or
  ``my_tools.py:lookup`` (one of them);
* an importable module: ``mypkg.tools`` or ``mypkg.tools:lookup`` (installed, or a
  package in the working directory).

:func:`resolve` imports the references here, on the host, and returns the tools with
the *sources* a sandbox must expose for the same modules to import inside it: a file is
shown as ``/sbx/<stem>.py``, a package's top-level directory as ``/sbx/<package>``;
modules installed in the Python environment are already visible there. Every problem
is a :class:`ToolReferenceError` naming the reference, raised before any work starts.

Host-side only: the sandbox imports the tool modules, never this file.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tools.sdk import _NAME, Tool, ToolDefinitionError

# top-level names the sandbox itself needs: a user module may not take them
RESERVED = frozenset({"tools", "sandboxes", "agent_spo"})


class ToolReferenceError(ValueError):
    """A tool reference cannot be used (missing, not a tool, a bad schema, a clash)."""


@dataclass(frozen=True)
class ToolSource:
    """A user module the sandbox must import (at start: a failure stops it): ``module``
    (its import name); ``path`` the file or top-level package directory to expose as
    ``/sbx/<name>``, or None when the module is installed in the environment (already
    importable there)."""

    module: str
    path: str | None = None

    @property
    def name(self) -> str:
        """The entry under /sbx: ``stem.py`` for a file, the package name for a directory."""
        assert self.path is not None
        return os.path.basename(self.path)

    def to_dict(self) -> dict:
        return {"module": self.module, "path": self.path}


@dataclass(frozen=True)
class Resolved:
    """What a list of references offers: the tools in order, where each came from, and
    the user modules a sandbox must expose."""

    tools: list[Tool]
    origin: dict[str, str]  # tool name -> the reference that brought it
    sources: list[ToolSource]

    @property
    def modules(self) -> list[str]:
        return [s.module for s in self.sources]


def offer(tools) -> list[dict]:
    """What a sandbox server advertises and a client checks, as JSON gives it back: each
    tool's schema and the function its calls import (``module:function``; None for a
    code tool, whose body never runs)."""
    return json.loads(json.dumps([
        {"schema": t.schema(),
         "target": None if t.kind == "code" else f"{t.module}:{t.fn.__name__}"}
        for t in tools
    ]))  # fmt: skip


def builtin_names() -> list[str]:
    from tools import builtin_tools

    return [t.name for t in builtin_tools()]


def is_builtin(ref: str) -> bool:
    return ref in builtin_names()


def resolve(refs: Sequence[str], *, base: str | os.PathLike | None = None) -> Resolved:
    """Import every reference (relative paths from ``base``, default the working
    directory) and return the tools they offer, checked: each a ``@tool``, its schema
    JSON the model can receive, no two with one name."""
    from tools import builtin_tools

    builtins = {t.name: t for t in builtin_tools()}
    base_dir = Path(base or os.getcwd())
    tools: list[Tool] = []
    origin: dict[str, str] = {}
    sources: dict[str, ToolSource] = {}
    for ref in refs:
        if not isinstance(ref, str) or not ref.strip():
            raise ToolReferenceError(f"tool reference {ref!r} is empty")
        if ref in builtins:
            found = [builtins[ref]]
        else:
            module, source, attr = _import(ref, base_dir)
            if source.module not in sources:
                sources[source.module] = source
            found = _tools_of(ref, module, attr)
        for t in found:
            _check_schema(ref, t)
            if t.name in origin:
                raise ToolReferenceError(
                    f"tool reference {ref!r} offers a tool named {t.name!r}, and so does "
                    f"{origin[t.name]!r}: tool names must be unique (rename one with "
                    "@tool(name=...))"
                )
            origin[t.name] = ref
            tools.append(t)
    return Resolved(tools, origin, list(sources.values()))


def split_ref(ref: str) -> tuple[str, str | None]:
    """(module or file, function or None) of ``target[:function]``."""
    target, sep, attr = ref.rpartition(":")
    if not sep or "/" in attr or attr.endswith(".py"):
        return ref, None
    if not _NAME.match(attr):
        raise ToolReferenceError(f"tool reference {ref!r}: {attr!r} is not a function name")
    return target, attr


def absolute(ref: str, base: str | os.PathLike | None = None) -> str:
    """The reference with a file path made absolute (what a run's config.yaml records,
    so a resumed run finds the file from any working directory)."""
    target, attr = split_ref(ref)
    if not target.endswith(".py"):
        return ref
    path = str((Path(base or os.getcwd()) / target).resolve())
    return f"{path}:{attr}" if attr else path


# ------------------------------------------------------------------------ importing
def _import(ref: str, base: Path) -> tuple[ModuleType, ToolSource, str | None]:
    target, attr = split_ref(ref)
    if target.endswith(".py") or "/" in target or os.sep in target:
        return (*_import_file(ref, base / target), attr)
    return (*_import_module(ref, target, base), attr)


def _import_file(ref: str, path: Path) -> tuple[ModuleType, ToolSource]:
    path = path.resolve()
    if not path.is_file():
        raise ToolReferenceError(f"tool reference {ref!r}: no file {str(path)!r}")
    if path.suffix != ".py":
        raise ToolReferenceError(f"tool reference {ref!r}: a tool file must end in .py")
    name = path.stem
    if not name.isidentifier():
        raise ToolReferenceError(
            f"tool reference {ref!r}: {path.name!r} cannot be imported as a module "
            "(use letters, digits and underscores)"
        )
    if name in RESERVED:
        raise ToolReferenceError(
            f"tool reference {ref!r}: the module name {name!r} is the sandbox's own; "
            "rename the file"
        )
    loaded = sys.modules.get(name)
    if loaded is not None:
        if _same_file(getattr(loaded, "__file__", None), path):
            return loaded, ToolSource(name, str(path))
        raise ToolReferenceError(
            f"tool reference {ref!r}: a module named {name!r} is already imported from "
            f"{getattr(loaded, '__file__', None) or 'the interpreter'}; rename the file"
        )
    elsewhere = importlib.util.find_spec(name)
    if elsewhere is not None and not _same_file(elsewhere.origin, path):
        raise ToolReferenceError(
            f"tool reference {ref!r}: the file would shadow the module {name!r} "
            f"({elsewhere.origin or 'built in'}) inside the sandbox; rename the file"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py file always has one
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module may raise
        # anything at import; it is a bad reference, reported before any work
        del sys.modules[name]
        raise ToolReferenceError(_import_failure(ref, e)) from e
    return module, ToolSource(name, str(path))


def _import_module(ref: str, name: str, base: Path) -> tuple[ModuleType, ToolSource]:
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts):
        raise ToolReferenceError(
            f"tool reference {ref!r}: not a built-in tool ({', '.join(builtin_names())}), "
            "a .py file or a module name"
        )
    top = parts[0]
    if top in RESERVED and name != "tools" and not name.startswith("tools."):
        raise ToolReferenceError(f"tool reference {ref!r}: {top!r} is not a tool module")
    if importlib.util.find_spec(top) is None and (
        (base / top).is_dir() or (base / f"{top}.py").is_file()
    ):
        sys.path.append(str(base))  # a package beside the config, not installed
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name and "." not in name:
            raise ToolReferenceError(
                f"unknown tool {ref!r}: not a built-in tool ({', '.join(builtin_names())}), "
                f"and no file or module of that name"
            ) from e
        raise ToolReferenceError(_import_failure(ref, e)) from e
    except (Exception, SystemExit) as e:  # noqa: BLE001 - as for a file: a bad reference
        raise ToolReferenceError(_import_failure(ref, e)) from e
    # the project's own tools package is always shown to the sandbox
    return module, ToolSource(name, None if top == "tools" else _exposed_path(ref, top))


def _exposed_path(ref: str, top: str) -> str | None:
    """The file or package directory of top-level module ``top`` that the sandbox must be
    shown, or None when it lives in the Python environment (which every sandbox sees).
    A namespace package (a directory without ``__init__.py``) is refused: showing it
    would show everything in that directory."""
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin in ("built-in", "frozen"):
        return None
    if spec.origin is None:
        dirs = ", ".join(spec.submodule_search_locations or [])
        raise ToolReferenceError(
            f"tool reference {ref!r}: {top!r} is a plain directory ({dirs}), not a package; "
            f"the sandbox would have to show all of it: add an __init__.py to it, or name "
            "the tool file itself (path/to/tools.py)"
        )
    origin = Path(spec.origin)
    where = (origin.parent if spec.submodule_search_locations else origin).resolve()
    env = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib", "stdlib")}
    if any(where == d or d in where.parents for d in env):
        return None
    return str(where)


def _import_failure(ref: str, e: BaseException) -> str:
    what = f"{type(e).__name__}: {e}"
    hint = ""
    if isinstance(e, ModuleNotFoundError) and e.name:
        hint = (
            f" (a tool's imports must be installed in this Python environment, which the "
            f"sandbox uses too: pip install {e.name.split('.')[0]})"
        )
    elif isinstance(e, ToolDefinitionError):
        hint = " (the model cannot be given this tool's schema)"
    return f"tool reference {ref!r} cannot be imported: {what}{hint}"


def _same_file(a: str | None, b: Path) -> bool:
    return a is not None and Path(a).resolve() == b.resolve()


# --------------------------------------------------------------------- the tools in it
def _tools_of(ref: str, module: ModuleType, attr: str | None) -> list[Tool]:
    if attr is not None:
        value = getattr(module, attr, None)
        if value is None:
            offered = [t.name for t in _defined(module)]
            raise ToolReferenceError(
                f"tool reference {ref!r}: {module.__name__} has no {attr!r}"
                + (f"; its tools: {', '.join(offered)}" if offered else "")
            )
        if not isinstance(value, Tool):
            raise ToolReferenceError(
                f"tool reference {ref!r}: {attr!r} is a {type(value).__name__}, not a tool; "
                "decorate it with @tool (from tools.sdk import tool)"
            )
        found = [value]
    else:
        found = _defined(module)
        if not found:
            raise ToolReferenceError(
                f"tool reference {ref!r}: {module.__name__} defines no @tool function"
            )
    for t in found:
        if getattr(sys.modules.get(t.module), t.fn.__name__, None) is not t:
            raise ToolReferenceError(
                f"tool reference {ref!r}: tool {t.name!r} must be defined at the top level "
                f"of {t.module} under its function's name {t.fn.__name__!r} (the sandbox "
                "imports it from there)"
            )
    return found


def _defined(module: ModuleType) -> list[Tool]:
    """The tools a module defines (not those it imports), in definition order."""
    return [v for v in vars(module).values() if isinstance(v, Tool) and v.module == module.__name__]


def _check_schema(ref: str, t: Tool) -> None:
    try:
        json.dumps(t.schema(), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ToolReferenceError(
            f"tool reference {ref!r}: the schema of tool {t.name!r} is not JSON the model "
            f"can receive ({e}); use defaults of type str, int, float, bool or None"
        ) from None


__all__ = [
    "RESERVED",
    "Resolved",
    "ToolReferenceError",
    "ToolSource",
    "absolute",
    "builtin_names",
    "is_builtin",
    "offer",
    "resolve",
    "split_ref",
]
