"""`agent-spo bench fleet`: every part runs on real replica processes and reports sane,
consistent numbers (the figures themselves are in the README, from a full run)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, app

pytestmark = pytest.mark.slow


def test_bench_fleet_runs_each_part_and_writes_its_report(tmp_path):
    out = tmp_path / "fleet.json"
    result = CliRunner().invoke(app, [
        "bench", "fleet", "--sizes", "1M", "--repeats", "2", "--episodes", "4",
        "--workers", "4", "--requests", "3", "--out", str(out),
        "rollout.max_response_tokens=64",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    disk, gloo = report["sync"]
    assert (disk["path"], gloo["path"]) == ("disk", "gloo")
    assert disk["size"] == "1M" and 1e6 < disk["params"] < 1.5e6
    assert disk["bytes"] == 4 * disk["params"]  # float32, each tied weight once
    assert gloo["bytes"] >= disk["bytes"]  # the same weights, each aligned to 16 bytes
    assert 0 < disk["write_s"] < disk["sync_s"] and disk["in_process_s"] > 0
    assert gloo["write_s"] == 0 and gloo["sync_s"] > 0
    assert [r["setting"] for r in report["episodes"]] == [
        "in-process engine", "pool, 1 replica", "pool, 2 replicas"]  # fmt: skip
    for r in report["episodes"]:
        assert r["episodes"] == 4 and r["dropped"] == 0 and r["episodes_per_s"] > 0
    o = report["overhead"]
    assert o["requests"] == 3 and o["client_ms"] > 0 and o["pool_ms"] > 0
    assert "(a) weight sync" in result.output and "(c) one short generation" in result.output


def test_bench_fleet_refuses_an_unknown_size():
    result = CliRunner().invoke(app, ["bench", "fleet", "--sizes", "3M"])
    assert result.exit_code == EXIT_CONFIG
    assert "--sizes: unknown ['3M']; choose from 1M, 10M, 100M" in result.output
