"""What every command shares: the consoles, the config arguments, and how errors exit.

Exit codes: 0 success; 1 the job failed (e.g. every episode dropped); 2 bad config or
bad usage (named key, before any work); 4 the sandbox failed or is unavailable.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from agent_spo.config import ConfigError, TrainConfig, load_config

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_SANDBOX = 4

stdout = Console()
stderr = Console(stderr=True)


def fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code``."""
    stderr.print(Text(f"error: {message}", style="red"), soft_wrap=True)
    raise typer.Exit(code)


def positive_ints(text: str, option: str, example: str) -> list[int]:
    """A comma-separated list of integers >= 1 from an option; exits 2 naming it."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        fail(f"{option}: got {text!r}; expected integers >= 1 separated by commas, e.g. {example}")
    return values


def guard_commands(app: typer.Typer) -> None:
    """Wrap every command of ``app`` (and of its sub-apps) so that what a command meets
    on its way in exits with one line and its code rather than a traceback: a bad input
    file (a data file, a model directory) exits 2 like a bad config key; an engine that
    never answered exits 1; a sandbox that cannot start or answer exits 4. (Once
    episodes run, engine and sandbox failures are counted drops, not exceptions.)"""
    from agent_spo.builders import ModelPathError
    from agent_spo.data.problems import DatasetError
    from agent_spo.engines.base import EngineError
    from sandboxes.errors import SandboxError

    def guard(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (DatasetError, ModelPathError) as e:
                fail(str(e))
            except EngineError as e:
                fail(f"the engine is unavailable: {e}", EXIT_FAILED)
            except SandboxError as e:
                fail(f"sandbox: {e}", EXIT_SANDBOX)

        return guarded

    for info in app.registered_commands:
        info.callback = guard(info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard_commands(group.typer_instance)


def split_config(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """A first argument of the form key=value that is not a file is an override, so
    `agent-spo train learner.lr=1e-5` works without naming a config."""
    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, overrides


def load(config: str | None, overrides: list[str] | None) -> TrainConfig:
    """Load and validate a training config; on failure print every problem and exit 2."""
    config, overrides = split_config(config, overrides)
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        fail(str(e))


def bar_columns() -> tuple:
    """Progress-bar columns: description, bar, done/total, elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


def cell(value) -> str:
    """A table cell: '-' for None, 3 decimals for fractions, integers without '.0'."""
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3f}"
    return str(int(value)) if isinstance(value, float) else str(value)


ConfigArg = Annotated[
    str | None,
    typer.Argument(
        help="YAML run config (e.g. configs/demo.yaml). Omitted: the built-in defaults, "
        "which are the embedded CPU demo (the same as configs/demo.yaml).",
        metavar="CONFIG",
        show_default=False,
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as key.path=value, applied after the file, e.g. "
        "algo.rho.mode=constant learner.lr=1e-5 learner.betas=[0.9,0.95].",
        metavar="OVERRIDES",
        show_default=False,
    ),
]
