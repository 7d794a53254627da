"""Problem files, stable keys, splits, and the synthetic task set."""

import json
import math
from pathlib import Path

import pytest

from agent_spo.data.problems import DatasetError, load_problems, prompt_key, split
from agent_spo.data.synthetic import FAMILIES, _count_primes, make_tasks
from agent_spo.verify import verify

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")


@needs_data
@pytest.mark.parametrize("name, n", [("aime2024", 30), ("aime2025", 30), ("math500", 500)])
def test_real_benchmarks_load(name, n):
    ds = load_problems(DATA / name / f"{name}.jsonl")
    assert len(ds) == n and len(set(ds.keys)) == n
    assert all(p.problem and p.answer for p in ds)


@needs_data
def test_empty_answers_are_skipped_and_reported():
    ds = load_problems(DATA / "math_train" / "math_train.jsonl")
    assert any("empty answer" in reason for _, reason in ds.skipped)
    assert all(p.answer.strip() for p in ds)


def test_keys_follow_content_not_position_or_whitespace():
    assert prompt_key("What is 1+1?", "2") == prompt_key("What  is 1+1?\n", " 2")
    assert prompt_key("What is 1+1?", "2") != prompt_key("What is 1+1?", "3")
    assert len(prompt_key("x", "y")) == 16


def _write(tmp_path, rows):
    p = tmp_path / "set.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


@pytest.mark.parametrize("rows, message", [
    (['{"id": 1, "problem": "a"'], ":1: not valid JSON"),
    ([{"id": 1, "problem": "a"}], ":1: missing field(s) answer"),
    ([{"id": 1, "problem": "a", "answer": "1"}, {"id": 1, "problem": "b", "answer": "2"}],
     ":2: id '1' repeats line 1"),
    ([[1, 2]], "expected an object"),
    ([{"id": 1, "problem": "", "answer": "1"}], "no usable problems (1 rows skipped)"),
])  # fmt: skip
def test_bad_files_name_the_line(tmp_path, rows, message):
    with pytest.raises(DatasetError) as info:
        load_problems(_write(tmp_path, rows))
    assert message in str(info.value)


def test_duplicates_by_content_are_skipped_not_merged_silently(tmp_path):
    ds = load_problems(_write(tmp_path, [
        {"id": "a", "problem": "2+2?", "answer": "4"},
        {"id": "b", "problem": "2+2?", "answer": "4"},
        {"id": "c", "problem": "3+3?", "answer": "6"},
    ]))  # fmt: skip
    assert [p.id for p in ds] == ["a", "c"]
    assert ds.skipped == ((2, "same problem and answer as line 1"),)


def test_max_problems(tmp_path):
    rows = [{"id": i, "problem": f"p{i}", "answer": "1"} for i in range(10)]
    ds = load_problems(_write(tmp_path, rows), max_problems=3)
    assert [p.id for p in ds] == ["0", "1", "2"]


def test_missing_file_and_bad_parquet_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_problems("/nonexistent/set.jsonl")
    pq = tmp_path / "set.parquet"
    pq.write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="not a readable parquet file"):
        load_problems(pq)


def _write_parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_reads_the_same_problems_as_jsonl(tmp_path):
    rows = [{"id": f"q{i}", "problem": f"what is {i} + 1?", "answer": str(i + 1),
             "source": "toy"} for i in range(10)]  # fmt: skip
    jsonl = load_problems(_write(tmp_path, rows))
    cols = {k: [r[k] for r in rows] for k in ("id", "problem", "answer", "source")}
    parquet = load_problems(_write_parquet(tmp_path / "set.parquet", cols))
    assert parquet.problems == jsonl.problems
    assert load_problems(tmp_path / "set.parquet", max_problems=4).keys == jsonl.keys[:4]


def test_parquet_rows_are_checked_like_jsonl_rows(tmp_path):
    cols = {"id": ["a", "b", "c"], "problem": ["p", "", "r"], "answer": ["1", "2", "3"]}
    ds = load_problems(_write_parquet(tmp_path / "gap.parquet", cols))
    assert [p.id for p in ds] == ["a", "c"] and ds.skipped == ((2, "empty problem"),)
    cols = {"id": ["a", "a"], "problem": ["p", "q"], "answer": ["1", "2"]}
    with pytest.raises(DatasetError, match="id 'a' repeats line 1"):
        load_problems(_write_parquet(tmp_path / "dup.parquet", cols))


def test_parquet_without_the_fields_names_them(tmp_path):
    cols = {"prompt": ["p"], "reward_model": ["1"]}
    with pytest.raises(DatasetError, match="missing column.*id, problem, answer.*verl-format"):
        load_problems(_write_parquet(tmp_path / "verl.parquet", cols))


@needs_data
def test_shared_benchmark_round_trips_through_parquet(tmp_path):
    """A real benchmark file read as JSON lines and as parquet gives the same problems."""
    jsonl = load_problems(DATA / "aime2024" / "aime2024.jsonl")
    rows = [json.loads(line) for line in (DATA / "aime2024" / "aime2024.jsonl").open()]
    cols = {k: [r[k] for r in rows] for k in ("id", "problem", "answer", "source")}
    assert load_problems(_write_parquet(tmp_path / "aime2024.parquet", cols)).problems == (
        jsonl.problems
    )
    assert len(jsonl) == 30


def test_split_is_deterministic_and_disjoint():
    tasks = make_tasks(200, seed=1)
    train, test = split(tasks, 0.2)
    assert {p.key for p in train}.isdisjoint({p.key for p in test})
    assert len(train) + len(test) == 200 and 20 < len(test) < 60
    train2, test2 = split(list(reversed(tasks)), 0.2)  # order does not matter
    assert {p.key for p in test2} == {p.key for p in test}


def test_synthetic_tasks_are_reproducible_distinct_and_varied():
    a, b = make_tasks(100, seed=3), make_tasks(100, seed=3)
    assert a == b and make_tasks(100, seed=4) != a
    assert len({p.key for p in a}) == 100
    assert {p.source.split(":")[1] for p in a} == set(FAMILIES)
    assert len({p.source.split(":")[2] for p in a}) == 4  # all difficulty levels appear


def _trial_division_count(n):
    return sum(1 for k in range(2, n) if all(k % d for d in range(2, math.isqrt(k) + 1)))


def test_synthetic_answers_are_right():
    assert [_count_primes(n) for n in (0, 2, 3, 10, 100, 1000)] == [0, 0, 1, 4, 25, 168]
    assert _count_primes(5000) == _trial_division_count(5000)
    for p in make_tasks(60, seed=7):
        family = p.source.split(":")[1]
        nums = [int(x) for x in __import__("re").findall(r"\d+", p.problem)]
        if family == "product":
            assert int(p.answer) == nums[0] * nums[1]
        elif family == "modpow":
            base, exp, mod = nums
            r, b, e = 1, base % mod, exp  # square-and-multiply, independent of pow()
            while e:
                r, b, e = (r * b % mod if e & 1 else r), b * b % mod, e >> 1
            assert int(p.answer) == r
        elif family == "primes":
            assert int(p.answer) == _count_primes(nums[0])
        assert verify(p.answer, f"The answer is \\boxed{{{p.answer}}}.")


def test_a_synthetic_set_of_chosen_families_and_the_tool_demos_tasks():
    import numpy as np

    from agent_spo.data.synthetic import synthetic_families

    assert synthetic_families("synthetic") == FAMILIES
    assert synthetic_families("synthetic:product, base_digits") == ("product", "base_digits")
    assert synthetic_families("data/train.jsonl") is None
    with pytest.raises(ValueError, match=r"unknown synthetic task families \['nope'\]"):
        synthetic_families("synthetic:product,nope")
    tasks = make_tasks(50, seed=1, families=("base_digits",))
    assert {p.source.split(":")[1] for p in tasks} == {"base_digits"}
    for p in tasks:  # the digit sum by numpy's base conversion, independent of the maker
        n, base = (int(x) for x in __import__("re").findall(r"\d+", p.problem))
        assert 2 <= base <= 9 and 100 <= n < 10**6
        assert int(p.answer) == sum(int(d) for d in np.base_repr(n, base))
    with pytest.raises(ValueError, match="unknown task families"):
        make_tasks(5, families=("nope",))


def test_the_config_names_an_unknown_family():
    from agent_spo.config import ConfigError, load_config

    assert load_config(None, ["data.train=synthetic:base_digits"]).data.train == (
        "synthetic:base_digits"
    )
    with pytest.raises(ConfigError, match=r"data.train: .*unknown synthetic task families"):
        load_config(None, ["data.train=synthetic:nope"])
