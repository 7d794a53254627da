"""Problems from local JSON-lines or parquet files (fields `id`, `problem`, `answer`).

Each problem gets a stable *key*: a hash of its content (problem text and answer), which
the value tracker and the sampler use, so shuffling, re-exporting or re-numbering a file
does not reset what the tracker learned. No hub downloads: paths only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    id: str  # the file's own id (for people: logs, replay)
    problem: str
    answer: str
    source: str = ""

    @property
    def key(self) -> str:
        """Stable content key (used by the tracker and sampler)."""
        return prompt_key(self.problem, self.answer)


def prompt_key(problem: str, answer: str) -> str:
    """sha256 of the whitespace-normalised problem and answer, first 16 hex digits."""
    text = " ".join(problem.split()) + "\x1f" + " ".join(answer.split())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Dataset:
    """Loaded problems, plus the rows that were skipped and why (nothing is lost silently)."""

    name: str
    problems: tuple[Problem, ...]
    skipped: tuple[tuple[int, str], ...] = field(default=())  # (line number, reason)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.problems]


class DatasetError(ValueError):
    """The file cannot be used; the message names the file and the line."""


def load_problems(path: str | Path, max_problems: int | None = None) -> Dataset:
    """Read a .jsonl or .parquet file of {id, problem, answer[, source]} rows.

    Rows with an empty problem or answer are skipped and listed in `Dataset.skipped`;
    malformed JSON, missing fields, duplicate ids or duplicate content raise
    DatasetError naming the line (the 1-based row, for parquet).
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p}")
    rows = _parquet_rows(p) if p.suffix == ".parquet" else _jsonl_rows(p)
    problems: list[Problem] = []
    skipped: list[tuple[int, str]] = []
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, int] = {}
    for lineno, row in rows:
        missing = [k for k in ("id", "problem", "answer") if k not in row]
        if missing:
            raise DatasetError(
                f"{p}:{lineno}: missing field(s) {', '.join(missing)}; "
                f"have {', '.join(sorted(row))}"
            )
        pid, problem, answer = str(row["id"]), str(row["problem"]), str(row["answer"])
        if not problem.strip() or not answer.strip():
            skipped.append((lineno, "empty problem" if not problem.strip() else "empty answer"))
            continue
        if pid in seen_ids:
            raise DatasetError(f"{p}:{lineno}: id {pid!r} repeats line {seen_ids[pid]}")
        item = Problem(pid, problem, answer, str(row.get("source") or ""))
        if item.key in seen_keys:
            skipped.append((lineno, f"same problem and answer as line {seen_keys[item.key]}"))
            continue
        seen_ids[pid] = seen_keys[item.key] = lineno
        problems.append(item)
        if max_problems is not None and len(problems) >= max_problems:
            break
    if not problems:
        raise DatasetError(f"{p}: no usable problems ({len(skipped)} rows skipped)")
    return Dataset(p.stem, tuple(problems), tuple(skipped))


def _jsonl_rows(p: Path) -> Iterator[tuple[int, dict]]:
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DatasetError(f"{p}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{p}:{lineno}: expected an object with id, problem, answer")
            yield lineno, row


def _parquet_rows(p: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a parquet file with columns id, problem, answer[, source], in batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise DatasetError(f"{p}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        f = pq.ParquetFile(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DatasetError(f"{p}: not a readable parquet file ({e})") from None
    names = f.schema_arrow.names
    missing = [k for k in ("id", "problem", "answer") if k not in names]
    if missing:
        hint = (
            " (this is a verl-format file: prompt/reward_model; use the normalised .jsonl "
            "beside it)"
            if "reward_model" in names
            else ""
        )
        raise DatasetError(
            f"{p}: missing column(s) {', '.join(missing)}; have {', '.join(names)}{hint}"
        )
    columns = [c for c in ("id", "problem", "answer", "source") if c in names]
    lineno = 0
    for batch in f.iter_batches(batch_size=4096, columns=columns):
        for row in batch.to_pylist():
            lineno += 1
            yield lineno, {k: v for k, v in row.items() if v is not None}


def split(
    problems: Sequence[Problem], held_out: float, salt: str = ""
) -> tuple[list[Problem], list[Problem]]:
    """Deterministic train / held-out split by content key (stable under reordering)."""
    if not 0.0 <= held_out < 1.0:
        raise ValueError(f"held_out must lie in [0, 1), got {held_out}")
    train: list[Problem] = []
    test: list[Problem] = []
    for prob in problems:
        h = int(hashlib.sha256((salt + prob.key).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (test if h < held_out else train).append(prob)
    return train, test
