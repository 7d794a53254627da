"""Reading configs: YAML with line numbers, dotted overrides, and one line per problem.

`load_yaml_config(schema, path, overrides)` reads YAML, applies `key.path=value`
overrides to the raw mapping, then validates against any `Section` model (the training
config here, the eval config in `agent_spo.evaluate.config`). Every problem is reported at
once, one line each, naming the full dotted key, what is allowed, and where it came from
(the file's line, or the override).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from agent_spo.config.schema import Section, TrainConfig

__all__ = [
    "ConfigError",
    "dump_config",
    "load_config",
    "load_yaml_config",
    "write_resolved",
]

S = TypeVar("S", bound=Section)


class ConfigError(Exception):
    """A config could not be loaded; `problems` holds one human-readable line each."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n > 1 else ''} in {source}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's floats and booleans: `1e-5` is a float, not a string,
    and only true/false are booleans, so `gradient_checkpointing: on` stays the string
    'on' (a boolean field still takes on/off/yes/no: pydantic reads those)."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    ch: [r for r in resolvers if r[0] not in (_FLOAT_TAG, _BOOL_TAG)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[0-9][0-9_]*[eE][-+]?[0-9]+)
              |[-+]?\.(?:inf|Inf|INF)
              |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

Loc = tuple[str, ...]  # a dotted key as its parts; list items by their index as text


# ---------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int], list[str]]:
    """Parse YAML text; return (data, line of each key and list item by path, problems)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        return None, {}, [f"{source}: not valid YAML{where}: {problem}"]
    finally:
        loader.dispose()

    lines: dict[Loc, int] = {}
    problems: list[str] = []

    def walk(n: yaml.Node, loc: Loc) -> None:
        if isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[(*loc, str(i))] = item.start_mark.line + 1
                walk(item, (*loc, str(i)))
            return
        if not isinstance(n, yaml.MappingNode):
            return
        for key_node, value_node in n.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            sub = (*loc, str(key_node.value))
            line = key_node.start_mark.line + 1
            if sub in lines:
                problems.append(
                    f"duplicate key '{'.'.join(sub)}' ({source} lines {lines[sub]} and {line})"
                )
            lines[sub] = line
            walk(value_node, sub)

    if node is not None:
        walk(node, ())
    return data, lines, problems


def _read_file(
    path: Path, schema: type[Section]
) -> tuple[dict[str, Any], dict[Loc, int], list[str]]:
    source = str(path)
    if not path.exists():
        return {}, {}, [f"config file not found: {source}"]
    if not path.is_file():
        return {}, {}, [f"config path is not a file: {source}"]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return {}, {}, [f"cannot read {source}: {e}"]
    data, lines, problems = _parse_yaml(text, source)
    if problems and data is None:
        return {}, {}, problems
    if data is None:
        data = {}  # an empty file means "all defaults"
    if not isinstance(data, dict):
        problems.append(
            f"{source}: top level must be a mapping of sections "
            f"({', '.join(schema.model_fields)}), got {type(data).__name__}"
        )
        return {}, {}, problems
    return data, lines, problems


# ---------------------------------------------------------------------------------------
# Walking the schema
# ---------------------------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _as_section(tp: Any) -> type[Section] | None:
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


def _section_type(info: FieldInfo) -> type[Section] | None:
    """The section a field holds (`X` or `X | None`), else None."""
    return _as_section(_unwrap_optional(info.annotation)[0])


def _item_section_type(info: FieldInfo) -> type[Section] | None:
    """The section each item of a `list[X]` field is, else None."""
    inner, _ = _unwrap_optional(info.annotation)
    if typing.get_origin(inner) is list:
        return _as_section(typing.get_args(inner)[0])
    return None


def _key(loc: Sequence[Any]) -> str:
    """Dotted key text: ('eval', 'datasets', 0, 'path') -> 'eval.datasets[0].path'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# Keys an earlier version accepted, and why they went.
REMOVED = {
    "loss.kl_coef": "a KL penalty to a reference policy is not offered: the learner keeps "
    "no reference copy of the policy, and neither the paper nor its reference recipe "
    "trains with one; delete the key",
}


def _unknown_key(model: type[Section], loc: Sequence[Any]) -> str:
    if (why := REMOVED.get(_key(loc))) is not None:
        return f"'{_key(loc)}' was removed: {why}"
    allowed = sorted(model.model_fields)
    parent = f" under '{_key(loc[:-1])}'" if len(loc) > 1 else " at the top level"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{_key(loc)}'; allowed keys{parent}: {', '.join(allowed)}{hint}"


# ---------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------


def _apply_override(raw: dict[str, Any], text: str, schema: type[Section]) -> list[str]:
    """Set one `a.b.c=value` override in the raw mapping; return problems (if any)."""
    if "=" not in text:
        return [f"override '{text}' has no '='; expected the form key.path=value"]
    path_text, value_text = text.split("=", 1)
    loc: Loc = tuple(path_text.strip().split("."))
    if not all(loc):
        return [f"override '{text}': bad key path '{path_text}'; expected the form key.path=value"]

    # Walk the models alongside the raw mapping so a typo fails here, with a suggestion.
    model: type[Section] = schema
    node: dict[str, Any] = raw
    for i, part in enumerate(loc):
        here = loc[: i + 1]
        if part not in model.model_fields:
            return [_unknown_key(model, here)]
        info = model.model_fields[part]
        if i == len(loc) - 1:
            node[part] = _parse_value(value_text, info)
            return []
        section = _section_type(info)
        if section is None:
            return [
                f"override '{text}': '{'.'.join(here)}' is a value, not a section; "
                f"cannot set '{loc[i + 1]}' inside it"
            ]
        model = section
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return [
                f"override '{text}': '{'.'.join(here)}' holds {child!r}, not a mapping; "
                f"cannot set '{loc[i + 1]}' inside it"
            ]
        node = child
    return []


def _parse_value(text: str, info: FieldInfo) -> Any:
    """Parse an override value as YAML; a string field keeps the text as written."""
    try:
        value = yaml.load(text, Loader=_Loader)  # safe: _Loader subclasses SafeLoader
    except yaml.YAMLError:
        return text  # let validation say what was expected
    inner, _ = _unwrap_optional(info.annotation)
    if inner is str and value is not None and not isinstance(value, str):
        return text.strip()  # `run.name=123` is the string '123'
    return value


# ---------------------------------------------------------------------------------------
# Describing validation errors
# ---------------------------------------------------------------------------------------


def _lookup(raw: Any, loc: Sequence[Any]) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list | tuple) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _expected(info: FieldInfo) -> str:
    """Plain-words description of what a field accepts, e.g. 'a number > 0 or null'."""
    inner, optional = _unwrap_optional(info.annotation)
    if typing.get_origin(inner) is Literal:
        what = "one of " + ", ".join(repr(v) for v in typing.get_args(inner))
    elif inner is bool:
        what = "true or false"
    elif inner is int:
        what = "an integer"
    elif inner is float:
        what = "a number"
    elif inner is str:
        what = "a string"
    elif typing.get_origin(inner) is tuple:
        what = f"a list of {len(typing.get_args(inner))} numbers"
    elif typing.get_origin(inner) is list:
        item = typing.get_args(inner)[0]
        section = _as_section(item)
        what = "a list of " + (
            "mappings with keys " + ", ".join(section.model_fields)
            if section is not None
            else _PLURAL.get(item, str(item))
        )
    elif _as_section(inner) is not None:
        what = "a mapping with keys " + ", ".join(inner.model_fields)
    else:
        what = str(inner)
    bounds = [
        f"{sym} {getattr(m, attr):g}"
        for m in info.metadata
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(m, attr, None) is not None
    ]
    if bounds:
        what += " " + " and ".join(bounds)
    for m in info.metadata:
        if getattr(m, "min_length", None):
            what += f" (at least {m.min_length} item{'s' if m.min_length != 1 else ''})"
    return what + (" or null" if optional else "")


def _describe(err: dict[str, Any], raw: dict[str, Any], schema: type[Section]) -> str:
    """Turn one pydantic error into a line naming the dotted key and what is allowed."""
    loc = tuple(err["loc"])
    # Follow the error's path through the schema as far as it names fields: sections by
    # field name, items of a list of sections by index. Deeper parts (list items of plain
    # values, union branches) stay unnamed.
    model: type[Section] | None = schema
    item: type[Section] | None = None
    info: FieldInfo | None = None
    depth = 0
    for i, part in enumerate(loc):
        if isinstance(part, int) and item is not None:
            model, item, info, depth = item, None, None, i + 1
            continue
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        info = model.model_fields[part]
        model, item, depth = _section_type(info), _item_section_type(info), i + 1

    kind = err["type"]
    if kind == "extra_forbidden":
        if model is not None and depth == len(loc) - 1:
            return _unknown_key(model, loc)
        return f"unknown key '{_key(loc)}'"
    if kind in ("value_error", "assertion_error"):
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        if model is not None and depth == len(loc):
            # A section-level rule: spell its field names as full dotted keys.
            prefix = _key(loc) + "." if loc else ""
            names = "|".join(sorted(model.model_fields, key=len, reverse=True))
            return re.sub(rf"(?<![\w.'])({names})(?![\w'])", lambda m: prefix + m[1], msg)
        return f"{_key(loc)}: {msg}"
    if info is None:
        if model is not None and 0 < depth == len(loc):  # a list item that is no mapping
            fields = ", ".join(model.model_fields)
            return f"{_key(loc)}: expected a mapping with keys {fields}, got {_short(err.get('input'))}"
        return f"{_key(loc)}: {err['msg']}, got {_short(err.get('input'))}"

    key = _key(loc[:depth])
    if kind == "missing" and depth == len(loc):
        return f"{key}: required; expected {_expected(info)}"
    got = _lookup(raw, loc[:depth]) if depth < len(loc) else err.get("input")
    inner, _ = _unwrap_optional(info.annotation)
    if kind == "literal_error" and typing.get_origin(inner) is Literal:
        allowed = ", ".join(repr(v) for v in typing.get_args(inner))
        return f"{key}: got {_short(got)}; allowed values: {allowed}"
    return f"{key}: expected {_expected(info)}, got {_short(got)}"


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def load_yaml_config(
    schema: type[S], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> S:
    """Read YAML (None = all defaults), apply `key.path=value` overrides, validate as `schema`.

    Raises ConfigError listing every problem, one line each, with its dotted key and the
    file line or override it came from.
    """
    source = "defaults" if path is None else str(path)
    if overrides:
        source += f" + {len(overrides)} override{'s' if len(overrides) > 1 else ''}"
    raw: dict[str, Any] = {}
    lines: dict[Loc, int] = {}
    problems: list[str] = []
    if path is not None:
        raw, lines, problems = _read_file(Path(path), schema)
        if problems and not raw:
            raise ConfigError(problems, source)

    overridden: list[tuple[Loc, str]] = []
    for text in overrides:
        found = _apply_override(raw, text, schema)
        problems += found
        if not found:
            overridden.append((tuple(text.split("=", 1)[0].strip().split(".")), text))

    def origin(loc: Loc) -> str:
        for o_loc, text in reversed(overridden):
            if loc[: len(o_loc)] == o_loc or (loc and o_loc[: len(loc)] == loc):
                return f" (from override '{text}')"
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f" ({path} line {lines[loc[:n]]})"
        return ""

    try:
        cfg = schema.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            line = _describe(dict(err), raw, schema) + origin(tuple(str(p) for p in err["loc"]))
            if line not in problems:
                problems.append(line)
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training config (None = all defaults), apply overrides, validate.

    Raises ConfigError listing every problem, one line each, with its dotted key.
    """
    return load_yaml_config(TrainConfig, path, overrides)


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML, keys in model order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_resolved(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """Write `run_dir/config.yaml` (all defaults filled); `load_config` of it gives `cfg`."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved config written by agent-spo; rerun with: agent-spo train <this file>\n"
    out.write_text(header + dump_config(cfg), encoding="utf-8")
    return out
