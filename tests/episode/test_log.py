"""Episode logs: torn tails skipped with a warning, repaired before appending, streamed.

The logs here are made of real Trajectory rows (to_json), the same bytes the trainer,
`rollout` and `eval` write.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pytest

from agent_spo.episode.log import (
    EpisodeLog,
    EpisodeLogError,
    EpisodeLogWarning,
    append_row,
    open_for_append,
    repair_tail,
)
from agent_spo.episode.trajectory import Segment, ToolCallRecord, Trajectory


def _traj(i: int, *, tokens: int = 40, reward: float | None = 1.0) -> Trajectory:
    return Trajectory(
        prompt_id=f"p{i % 7}",
        prompt_token_ids=list(range(1, 30)),
        segments=[
            Segment("model", list(range(100, 100 + tokens)), [-0.25] * tokens, i % 3),
            Segment("tool", [5, 6, 7]),
            Segment("model", [8, 9], [-0.5, -0.125], i % 3),
        ],
        tool_calls=[
            ToolCallRecord(
                "python",
                {"code": "print(1)"},
                "1",
                "tool" if i % 5 == 0 else None,
                "error" if i % 5 == 0 else "ok",
                0.01,
            )  # fmt: skip
        ],
        answer=str(i),
        verdict="correct" if reward else "incorrect",
        reward=reward,
        timings={"total_s": 0.5},
        stop_reason="answer",
        info={"prompt_key": f"k{i % 7}", "gold": "1"},
    )


def _row(i: int, **kw) -> str:
    row = json.loads(_traj(i, **kw).to_json())
    row["train"] = {"step": i // 4 + 1, "v_hat": 0.5, "lag": i % 2}
    return json.dumps(row)


def _write(path, n: int, **kw) -> list[str]:
    lines = [_row(i, **kw) for i in range(n)]
    path.write_text("".join(line + "\n" for line in lines))
    return lines


def test_rows_and_summaries_agree_with_the_trajectories(tmp_path):
    path = tmp_path / "episodes.jsonl"
    _write(path, 12)
    log = EpisodeLog(path)
    rows = list(log)
    assert [r.index for r in rows] == list(range(12))
    assert Trajectory.from_json(json.dumps(rows[3].data)) == _traj(3)
    sums = list(log.summaries())
    assert [s.offset for s in sums] == [r.offset for r in rows]
    s = sums[5]  # i = 5: a tool fault (5 % 5 == 0), step 5 // 4 + 1 = 2, lag 1
    assert (s.prompt_id, s.turns, s.faults, s.answer, s.verdict) == (
        "p5",
        2,
        ("tool",),
        "5",
        "correct",
    )
    assert (s.train["step"], s.train["lag"], s.total_s) == (2, 1, 0.5)
    assert log.read_at(s.offset)["prompt_id"] == "p5"
    assert log.get(7).data["answer"] == "7"


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "episodes.jsonl"
    lines = _write(path, 5)
    with path.open("a") as f:
        f.write(_row(5)[:-40])  # the writer died mid-line
    log = EpisodeLog(path)
    with pytest.warns(EpisodeLogWarning, match="last line .* is torn"):
        assert [r.data["answer"] for r in log] == ["0", "1", "2", "3", "4"]
    assert log.report.torn_tail == 6 and log.report.skipped == 1
    with pytest.warns(EpisodeLogWarning, match="torn"):
        assert len(list(log.summaries())) == 5
    assert len(lines) == 5


def test_a_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text(_row(0) + "\n" + _row(1))
    messages = []
    assert len(list(EpisodeLog(path, warn=messages.append))) == 2
    assert messages == []


def test_a_corrupt_middle_line_is_skipped_and_named(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text(_row(0) + "\n{broken\n\n" + _row(1) + "\n")
    messages = []
    log = EpisodeLog(path, warn=messages.append)
    assert [r.data["answer"] for r in log] == ["0", "1"]
    assert log.report.bad_lines[0][0] == 2 and "line 2" in messages[0]


def test_repair_cuts_a_torn_tail_so_appends_start_a_clean_line(tmp_path):
    path = tmp_path / "episodes.jsonl"
    _write(path, 3)
    clean_size = path.stat().st_size
    with path.open("a") as f:
        f.write(_row(3)[:100])
    f, what = open_for_append(path)
    assert "torn" in what and path.stat().st_size == clean_size
    with f:
        append_row(f, _row(4))
    assert [r.data["answer"] for r in EpisodeLog(path)] == ["0", "1", "2", "4"]
    assert repair_tail(path) is None  # already clean
    with path.open("a") as f2:
        f2.write(_row(5))  # whole row, no newline
    assert "newline" in repair_tail(path)
    assert path.read_text().endswith("}\n")


def test_repair_handles_a_file_that_is_one_torn_line(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text('{"prompt_id": "p0", "segm')
    assert "torn" in repair_tail(path)
    assert path.stat().st_size == 0


def test_missing_log_and_bad_requests_are_named(tmp_path):
    with pytest.raises(EpisodeLogError, match="not found"):
        EpisodeLog(tmp_path / "nope.jsonl")
    path = tmp_path / "episodes.jsonl"
    _write(path, 2)
    log = EpisodeLog(path)
    with pytest.raises(EpisodeLogError, match="no episode 5"):
        log.get(5)
    with pytest.raises(EpisodeLogError, match="outside the file"):
        log.read_at(10**9)


def test_summaries_fall_back_to_a_full_parse_for_other_layouts(tmp_path):
    path = tmp_path / "episodes.jsonl"
    row = json.loads(_row(0))
    reordered = {"answer": row["answer"], **{k: v for k, v in row.items() if k != "answer"}}
    reordered["tool_calls"], reordered["segments"] = row["tool_calls"], row["segments"]
    path.write_text(json.dumps(reordered) + "\n")
    (s,) = EpisodeLog(path).summaries()
    assert (s.prompt_id, s.turns, s.answer) == ("p0", 2, "0")


def test_streaming_a_multi_megabyte_log_keeps_memory_flat(tmp_path):
    """~4 MB of long rows: peak Python allocations stay far below the file size."""
    path = tmp_path / "episodes.jsonl"
    row = _row(1, tokens=2000)  # ~30 KB per line
    with path.open("w") as f:
        for _ in range(4_000_000 // len(row)):
            f.write(row + "\n")
    size = path.stat().st_size
    log = EpisodeLog(path)
    tracemalloc.start()
    try:
        n_rows = sum(1 for _ in log)
        _, peak_rows = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        n_sums = sum(1 for _ in log.summaries())
        _, peak_sums = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n_rows == n_sums == size // (len(row) + 1)
    # one parsed row (2000 ints + 2000 floats ≈ 200 KB of objects) plus the read buffer
    assert peak_rows < 3_000_000, peak_rows
    assert peak_sums < 2_000_000, peak_sums
    assert size > 3_500_000


@pytest.mark.slow
def test_a_one_gigabyte_log_lists_in_seconds(tmp_path):
    """The viewer's pass over 1 GB: summaries only, flat memory, a few seconds."""
    path = tmp_path / "big.jsonl"
    row = (_row(2, tokens=1500) + "\n").encode()
    block = row * (16_000_000 // len(row))
    with path.open("wb") as f:
        while f.tell() < 1_000_000_000:
            f.write(block)
    with path.open("ab") as f:
        f.write(row[: len(row) // 2])  # and a torn tail
    log = EpisodeLog(path, warn=lambda m: None)
    t0 = time.perf_counter()
    first = next(iter(log.summaries()))
    open_s = time.perf_counter() - t0
    tracemalloc.start()
    t0 = time.perf_counter()
    count = sum(1 for _ in log.summaries())
    scan_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    size = os.path.getsize(path)
    print(f"1 GB log: first row {open_s * 1000:.0f} ms, full summary pass {scan_s:.1f} s "
          f"({size / scan_s / 1e6:.0f} MB/s), {count} rows, peak {peak / 1e6:.2f} MB")  # fmt: skip
    assert first.index == 0 and open_s < 1.0
    assert count == (size - len(row) // 2) // len(row) and log.report.torn_tail is not None
    assert peak < 5_000_000
    assert scan_s < 60


def test_a_turn_split_by_a_weight_update_counts_once(tmp_path):
    """An update mid-turn leaves two model segments in a row (versions 0 then 1): one turn,
    in the fast summary and in the full-parse fallback alike."""
    t = _traj(0)
    first, tool, last = t.segments
    split = Trajectory(
        t.prompt_id, t.prompt_token_ids,
        [Segment("model", first.token_ids[:10], first.logprobs[:10], 0),
         Segment("model", first.token_ids[10:], first.logprobs[10:], 1), tool, last],
        tool_calls=t.tool_calls, answer=t.answer, verdict=t.verdict, reward=t.reward,
        timings=t.timings, stop_reason=t.stop_reason, info=t.info,
    )  # fmt: skip
    row = json.loads(split.to_json())
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (fast,) = EpisodeLog(path).summaries()
    reordered = {"answer": row["answer"], **{k: v for k, v in row.items() if k != "answer"}}
    reordered["tool_calls"], reordered["segments"] = row["tool_calls"], row["segments"]
    path.write_text(json.dumps(reordered) + "\n")
    (slow,) = EpisodeLog(path).summaries()
    assert fast.turns == slow.turns == 2
    assert split.staleness(3) == 3  # the oldest segment counts
