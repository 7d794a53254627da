"""What every command shares: the consoles, the config arguments, and how errors exit.

Exit codes: 0 success; 1 the job failed (e.g. every episode dropped); 2 bad config or
bad usage (named key, before any work); 4 the sandbox failed or is unavailable.
"""

from __future__ import annotations

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
