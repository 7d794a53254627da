"""Episode logs: append-only JSON lines, read as a stream.

Every producer (`train`'s RUN_DIR/episodes.jsonl, `rollout`, `eval`) writes one
trajectory per line (``Trajectory.to_json``, plus a ``train`` or ``eval`` object) and
flushes it when the episode finishes, so a crash loses at most the line being written.
That line is then *torn*: no newline, not valid JSON. The reader skips it with a
warning, and :func:`repair_tail` cuts it off before a writer appends again, so a resumed
run never glues a new row onto a torn one.

Reading never loads the file. Rows are parsed one at a time; :meth:`EpisodeLog.summaries`
goes further and skips the token arrays (the bulk of every line), which is what lets the
viewer list and filter a 1 GB log in seconds with flat memory. A row is found again by
its byte offset (:meth:`EpisodeLog.read_at`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

_BUFFER = 1 << 20  # read-ahead per file; lines are yielded one at a time from it
_SEGMENTS = b', "segments": ['
_TOOL_CALLS = b'"tool_calls": '
_KIND = b'{"kind": "'


def _find_all(text: bytes, needle: bytes, start: int, end: int):
    i = text.find(needle, start, end)
    while i >= 0:
        yield i
        i = text.find(needle, i + 1, end)


def _runs(is_model: list[bool]) -> int:
    """Turns: runs of model segments in a row (an update mid-turn splits one turn)."""
    return sum(1 for i, m in enumerate(is_model) if m and (i == 0 or not is_model[i - 1]))


class EpisodeLogWarning(UserWarning):
    """A log line was skipped: a torn last line (a crash mid-write) or a corrupt line."""


class EpisodeLogError(ValueError):
    """The log cannot be read at all (missing file, not a file, a bad offset)."""


@dataclass(frozen=True)
class LogRow:
    """One parsed line of a log."""

    index: int  # 0-based among the log's good rows: the episode number replay shows
    offset: int  # byte offset of the line, for read_at
    line: int  # 1-based line number in the file, for messages
    data: dict[str, Any]


@dataclass(frozen=True)
class EpisodeSummary:
    """What the list view and the filters need from a row, without its token arrays."""

    index: int
    offset: int
    line: int
    prompt_id: str
    turns: int  # model segments
    tool_calls: tuple[dict, ...]  # name, fault, status, latency_s (arguments and output dropped)
    answer: str | None
    verdict: str | None
    reward: float | None
    stop_reason: str | None
    info: dict[str, Any]
    train: dict[str, Any] | None  # step, v_hat, lag[, v_hat_after, adv] in training logs
    eval: dict[str, Any] | None  # dataset, problem_id, sample in evaluation logs
    total_s: float | None

    @property
    def faults(self) -> tuple[str, ...]:
        return tuple(c["fault"] for c in self.tool_calls if c.get("fault"))


@dataclass
class ReadReport:
    """What a pass over the log skipped, and why (nothing is dropped silently)."""

    torn_tail: int | None = None  # line number of a torn last line
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    @property
    def skipped(self) -> int:
        return len(self.bad_lines) + (self.torn_tail is not None)


def _default_warn(message: str) -> None:
    warnings.warn(message, EpisodeLogWarning, stacklevel=3)


class EpisodeLog:
    """A read-only, streaming view of one episode log."""

    def __init__(self, path: str | Path, *, warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise EpisodeLogError(f"episode log not found: {self.path}")
        if not self.path.is_file():
            raise EpisodeLogError(f"episode log is not a file: {self.path}")
        self.warn = warn or _default_warn
        self.report = ReadReport()  # filled by the last full pass

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def _lines(self) -> Iterator[tuple[int, int, bytes, bool]]:
        """(line number, offset, text, terminated) for each non-blank line."""
        offset = 0
        with open(self.path, "rb", buffering=_BUFFER) as f:
            for number, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                terminated = raw.endswith(b"\n")
                text = raw.strip()
                if text:
                    yield number, start, text, terminated

    def _scan(self, parse: Callable[[bytes], Any]) -> Iterator[tuple[int, int, int, Any]]:
        """Parse every line; skip and report the torn tail and corrupt lines."""
        self.report = ReadReport()
        index = 0
        for number, offset, text, terminated in self._lines():
            try:
                value = parse(text)
            except (ValueError, KeyError, TypeError) as e:
                if not terminated:  # only the last line can lack its newline
                    self.report.torn_tail = number
                    self.warn(
                        f"{self.path}: the last line ({number}, {len(text)} bytes) is torn "
                        "(the writer stopped mid-line); skipped"
                    )
                else:
                    self.report.bad_lines.append((number, str(e)[:120]))
                    self.warn(f"{self.path}: line {number} is not a valid episode row ({e}); "
                              "skipped")  # fmt: skip
                continue
            yield index, offset, number, value
            index += 1

    def __iter__(self) -> Iterator[LogRow]:
        """Every good row, fully parsed, in file order."""
        for index, offset, number, data in self._scan(_parse_row):
            yield LogRow(index, offset, number, data)

    def summaries(self) -> Iterator[EpisodeSummary]:
        """Every good row's summary, in file order, parsing around the token arrays."""
        for index, offset, number, fields_ in self._scan(_parse_summary):
            yield EpisodeSummary(index=index, offset=offset, line=number, **fields_)

    def read_at(self, offset: int) -> dict[str, Any]:
        """The row that starts at byte `offset` (from a LogRow or EpisodeSummary)."""
        if offset < 0 or offset >= self.size:
            raise EpisodeLogError(f"{self.path}: offset {offset} is outside the file")
        with open(self.path, "rb") as f:
            f.seek(offset)
            text = f.readline()
        try:
            return _parse_row(text)
        except (ValueError, TypeError) as e:
            raise EpisodeLogError(f"{self.path}: no episode row at offset {offset} ({e})") from None

    def get(self, index: int) -> LogRow:
        """Row number `index` (0-based, as the list view numbers them); streams to it."""
        if index < 0:
            raise EpisodeLogError(f"episode numbers start at 0, got {index}")
        for s in self.summaries():
            if s.index == index:
                return LogRow(index, s.offset, s.line, self.read_at(s.offset))
        raise EpisodeLogError(f"{self.path}: no episode {index} (the log has fewer rows)")


def _parse_row(text: bytes) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict) or "prompt_id" not in data or "segments" not in data:
        raise ValueError("not an episode row (no prompt_id/segments)")
    return data


def _parse_summary(text: bytes) -> dict[str, Any]:
    """The summary fields of a row; skips the segments array when the layout allows.

    Rows are written by ``json.dumps`` in Trajectory.to_json's key order: the segments
    array (token ids and log-probs: numbers only, so no key text inside it) is followed
    at once by ``"tool_calls"``. The keys before and after it are parsed; the array is
    only counted. Any other layout falls back to a full parse.
    """
    a = text.find(_SEGMENTS)
    b = text.find(_TOOL_CALLS, a) if a >= 0 else -1
    if a > 0 and b > a and text[b - 3 : b] == b"], ":  # segments, then tool_calls at once
        tail = {**json.loads(text[:a] + b"}"), **json.loads(b"{" + text[b:])}
        kinds = [text[i + len(_KIND) : i + len(_KIND) + 5] == b"model"
                 for i in _find_all(text, _KIND, a, b)]  # fmt: skip
        turns = _runs(kinds)
    else:
        tail = _parse_row(text)
        turns = _runs([s.get("kind") == "model" for s in tail["segments"]])
    head = tail
    return {
        "prompt_id": str(head["prompt_id"]),
        "turns": turns,
        "tool_calls": tuple(
            {k: c.get(k) for k in ("name", "fault", "status", "latency_s")}
            for c in tail.get("tool_calls") or ()
        ),
        "answer": tail.get("answer"),
        "verdict": tail.get("verdict"),
        "reward": tail.get("reward"),
        "stop_reason": tail.get("stop_reason"),
        "info": tail.get("info") or {},
        "train": tail.get("train"),
        "eval": tail.get("eval"),
        "total_s": (tail.get("timings") or {}).get("total_s"),
    }


def repair_tail(path: str | Path) -> str | None:
    """Make a log safe to append to: cut a torn last line, or end a whole one with \\n.

    Returns what was done (None when the file was already clean or absent).
    """
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return None
    with open(p, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        start, end = 0, size  # find the start of the last line, reading backwards
        while end > 0:
            begin = max(0, end - _BUFFER)
            f.seek(begin)
            cut = f.read(end - begin).rfind(b"\n")
            if cut >= 0:
                start = begin + cut + 1
                break
            end = begin
        f.seek(start)
        last = f.read()
        try:
            _parse_row(last)
        except ValueError:
            f.truncate(start)
            f.flush()
            os.fsync(f.fileno())
            return f"cut a torn last line ({len(last)} bytes at offset {start})"
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
        return "ended the last line with a newline"


def open_for_append(path: str | Path) -> tuple[TextIO, str | None]:
    """Repair the tail, then open the log for appending; returns (file, what repair did)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fixed = repair_tail(p)
    return open(p, "a", encoding="utf-8"), fixed


def append_row(log: TextIO, line: str) -> None:
    """Write one row and flush it, so a crash can tear at most this line."""
    log.write(line + "\n")
    log.flush()
