"""The tool SDK: a tool is a typed Python function whose docstring is written for the model.

    @tool
    def factor(expression: str) -> str:
        \"\"\"Factor a polynomial over the rationals.

        Args:
            expression: The polynomial, in Python/sympy syntax, e.g. "x**2 - 1".
        \"\"\"

`@tool` reads the signature and the docstring's summary and `Args:` section and derives
the JSON schema the model sees (OpenAI / Qwen function-calling format). Arguments are
validated against that schema before anything runs; a bad call becomes a clear message
for the model (`ToolArgumentError`), never an exception in the trainer.

Two kinds of tool:
* ``kind="function"`` (default): the function itself is called, inside the sandbox, with
  the validated arguments; its return value is the output (a string as it is; numbers,
  lists and dicts as JSON; ``None`` is an error the model is shown). In a fresh process
  per call by default; ``stateful=True`` calls it in the episode's session process, so
  module-level state persists across the calls of one episode.
* ``kind="code"``: the tool's single string argument is a cell of Python code that runs
  in the episode's sandbox session (the ``python`` tool). The function body is not run.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

ToolKind = Literal["function", "code"]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class ToolDefinitionError(TypeError):
    """A tool cannot be described to the model (a programming error in the tool)."""


class ToolArgumentError(ValueError):
    """The model called a tool badly; the message is written for the model."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., Any]
    kind: ToolKind = "function"
    stateful: bool = False  # runs in the episode's session (state persists across calls)

    @property
    def module(self) -> str:
        return self.fn.__module__

    def schema(self) -> dict:
        """The exact function-calling schema the model receives."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Check a call's arguments (a dict or a JSON object string); return them with defaults."""
        if isinstance(arguments, str):
            text = arguments.strip() or "{}"
            try:
                arguments = json.loads(text, parse_constant=_reject_constant)
            except (ValueError, RecursionError) as e:
                where = (
                    f" ({e.msg} at position {e.pos})" if isinstance(e, json.JSONDecodeError) else ""
                )
                raise ToolArgumentError(
                    f"{self.name}: arguments are not valid JSON{where}; "
                    f"expected an object like {self._example()}"
                ) from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ToolArgumentError(
                f"{self.name}: arguments must be a JSON object like {self._example()}, "
                f"got {type(arguments).__name__}"
            )
        props = self.parameters["properties"]
        unknown = sorted(set(arguments) - set(props))
        if unknown:
            raise ToolArgumentError(
                f"{self.name}: unknown argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; allowed: {', '.join(props) or 'none'}"
            )
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if missing:
            raise ToolArgumentError(
                f"{self.name}: missing required argument{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))}"
            )
        out = {}
        for key, prop in props.items():
            if key in arguments:
                out[key] = _check(arguments[key], prop, f"{self.name}: argument {key!r}")
            elif "default" in prop:
                out[key] = prop["default"]
        return out

    def _example(self) -> str:
        props = self.parameters["properties"]
        req = self.parameters.get("required", list(props)[:1])
        return json.dumps({k: f"<{props[k].get('type', 'value')}>" for k in req})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    kind: ToolKind = "function",
    stateful: bool | None = None,
) -> Any:
    """Turn a typed, documented function into a :class:`Tool` (usable bare or with options)."""

    def wrap(f: Callable[..., Any]) -> Tool:
        tool_name = name or f.__name__
        if not _NAME.match(tool_name):
            raise ToolDefinitionError(f"tool name {tool_name!r} must match {_NAME.pattern}")
        summary, arg_docs = _parse_docstring(inspect.getdoc(f) or "")
        if not summary:
            raise ToolDefinitionError(f"tool {tool_name!r} needs a docstring for the model")
        hints = typing.get_type_hints(f)
        props: dict[str, dict] = {}
        required: list[str] = []
        for pname, param in inspect.signature(f).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ToolDefinitionError(f"tool {tool_name!r}: *args/**kwargs cannot be described")
            if pname not in hints:
                raise ToolDefinitionError(
                    f"tool {tool_name!r}: parameter {pname!r} has no type hint"
                )
            if pname not in arg_docs:
                raise ToolDefinitionError(
                    f"tool {tool_name!r}: parameter {pname!r} is not described under 'Args:'"
                )
            prop = _json_type(hints[pname], f"{tool_name}.{pname}")
            prop["description"] = arg_docs[pname]
            if param.default is param.empty:
                required.append(pname)
            else:
                prop["default"] = param.default
            props[pname] = prop
        if kind == "code" and [p.get("type") for p in props.values()] != ["string"]:
            raise ToolDefinitionError(f"code tool {tool_name!r} must take one string argument")
        params = {"type": "object", "properties": props, "required": required}
        return Tool(
            name=tool_name,
            description=summary,
            parameters=params,
            fn=f,
            kind=kind,
            stateful=(kind == "code") if stateful is None else stateful,
        )

    return wrap(fn) if fn is not None else wrap


class ToolReturnError(TypeError):
    """A tool returned something that is not its result (None)."""


def run_in_sandbox(module: str, attr: str, payload: str) -> None:
    """Call a function tool inside the sandbox and print its result: what the generated
    cell of every function-tool call runs. A string is printed as it is; numbers, lists
    and dicts as JSON (else ``str``); ``None`` is an error the model sees."""
    import importlib

    t = getattr(importlib.import_module(module), attr)
    print(result_text(t, t.fn(**json.loads(payload))))


def result_text(t: Tool, value: Any) -> str:
    """What the model reads for a function tool's return value."""
    if value is None:
        raise ToolReturnError(
            f"tool {t.name!r} returned None; a tool returns its result (a string)"
        )
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)


# ----------------------------------------------------------------------- schema helpers
def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description before 'Args:', {param: description}) from a Google-style docstring."""
    lines = doc.splitlines()
    summary: list[str] = []
    args: dict[str, str] = {}
    i = 0
    while i < len(lines) and lines[i].strip() not in ("Args:", "Arguments:", "Parameters:"):
        summary.append(lines[i])
        i += 1
    current = None
    for line in lines[i + 1 :]:
        if line.strip() in ("Returns:", "Raises:", "Examples:", "Example:"):
            break
        m = re.match(r"^\s{2,}(\w+)\s*(\([^)]*\))?:\s*(.*)$", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 4):
            current = m.group(1)
            args[current] = m.group(3).strip()
        elif current and line.strip():
            args[current] += " " + line.strip()
    # Reflow: the model reads paragraphs, not the source's line wrapping.
    paragraphs = "\n".join(summary).strip().split("\n\n")
    text = "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
    return text, args


def _json_type(hint: Any, where: str) -> dict:
    origin = typing.get_origin(hint)
    targs = typing.get_args(hint)
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if origin is Literal:
        kinds = {type(a) for a in targs}
        if len(kinds) != 1 or next(iter(kinds)) not in (str, int):
            raise ToolDefinitionError(f"{where}: Literal values must be all str or all int")
        return {"type": "string" if str in kinds else "integer", "enum": list(targs)}
    if origin in (list, typing.List):  # noqa: UP006
        if len(targs) != 1:
            raise ToolDefinitionError(f"{where}: use list[X] with one item type")
        return {"type": "array", "items": _json_type(targs[0], where)}
    if origin in (Union, types.UnionType):
        rest = [a for a in targs if a is not type(None)]
        nullable = len(rest) != len(targs)
        if len(rest) == 1:
            inner = _json_type(rest[0], where)
            return {**inner, "type": [inner["type"], "null"]} if nullable else inner
        options = [_json_type(a, where) for a in rest]
        return {"anyOf": options + ([{"type": "null"}] if nullable else [])}
    raise ToolDefinitionError(f"{where}: type {hint!r} has no JSON schema here")


def _check(value: Any, prop: dict, where: str) -> Any:
    kinds = prop.get("type")
    if isinstance(kinds, list):  # [T, "null"]
        if value is None:
            return None
        prop = {**prop, "type": kinds[0]}
    if value is None and prop.get("type") != "null":
        if "anyOf" in prop and {"type": "null"} in prop["anyOf"]:
            return None
        raise ToolArgumentError(f"{where} must not be null")
    if "anyOf" in prop:
        for option in prop["anyOf"]:
            try:
                return _check(value, option, where)
            except ToolArgumentError:
                continue
        kinds = " or ".join(o.get("type", "?") for o in prop["anyOf"])
        raise ToolArgumentError(f"{where} must be {kinds}, got {_show(value)}")
    kind: Any = prop.get("type")  # a JSON schema value
    ok = {
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "array": isinstance(value, list),
        "null": value is None,
    }.get(kind, True)
    if not ok:
        article = "an" if kind in ("integer", "array") else "a"
        raise ToolArgumentError(f"{where} must be {article} {kind}, got {_show(value)}")
    if "enum" in prop and value not in prop["enum"]:
        raise ToolArgumentError(
            f"{where} must be one of {', '.join(map(repr, prop['enum']))}, got {value!r}"
        )
    if kind == "array":
        return [_check(v, prop["items"], f"{where}[{i}]") for i, v in enumerate(value)]
    if kind == "number":
        try:
            number = float(value)
        except OverflowError:
            raise ToolArgumentError(f"{where} is too large for a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ToolArgumentError(f"{where} must be a finite number")
        return number
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"
