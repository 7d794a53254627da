"""`agent-spo verify` output is valid UTF-8 even when the input holds lone surrogates.

A lone surrogate ("\\ud800") reaches the verifier from a JSONL file ("\\ud800" escapes),
or from argv bytes that are not UTF-8 (Python decodes them to "\\udc80".."\\udcff").
UTF-8 cannot encode it: the JSON must carry it escaped, and json.loads gives it back.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from agent_spo.cli import app

runner = CliRunner()


def test_json_one_pair_with_a_lone_surrogate():
    result = runner.invoke(app, ["verify", "--json", "1", "so \\boxed{\ud800 2}"])
    assert result.exit_code == 0, repr(result.exception)
    text = result.stdout_bytes.decode("utf-8")  # strict: raises on invalid UTF-8
    assert "\\ud800" in text
    verdict = json.loads(text)
    assert verdict["prediction"] == "\ud800 2"  # escaped, so read back exactly
    assert verdict["status"] == "unparseable" and verdict["gold_parsed"] == "1"


def test_json_file_with_lone_surrogates_keeps_other_text(tmp_path):
    rows = [
        {"id": "a\udc80", "gold": "\\frac{1}{2}", "response": "\\boxed{0.5} \udcff", "label": True},
        {"id": "π", "gold": "3", "response": "\\boxed{\udc80}", "label": False},
    ]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps(r) + "\n" for r in rows))  # ASCII: \\u escapes
    result = runner.invoke(app, ["verify", "--file", str(cases), "--json"])
    assert result.exit_code == 0, repr(result.exception)
    text = result.stdout_bytes.decode("utf-8")
    assert "π" in text  # other non-ASCII text stays readable, not \\u03c0
    out = [json.loads(line) for line in text.splitlines()]
    assert [o["id"] for o in out] == ["a\udc80", "π"]
    assert [o["correct"] for o in out] == [True, False]
    assert out[1]["prediction"] == "\udc80" and out[0]["label"] is True


def test_text_output_with_a_lone_surrogate():
    result = runner.invoke(app, ["verify", "1", "\\boxed{\ud800}"])
    assert result.exit_code == 0, repr(result.exception)
    text = result.stdout_bytes.decode("utf-8")
    assert "extracted: \\ud800" in text


def test_argv_bytes_that_are_not_utf8_give_valid_utf8_json():
    # UTF-8 mode: argv byte 0x80 arrives as "\udc80", and stdout's surrogateescape would
    # write it back as the raw byte 0x80: not UTF-8.
    env = {**os.environ, "PYTHONUTF8": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "agent_spo.cli", "verify", "--json", "1", b"\\boxed{\x80}"],
        capture_output=True, timeout=120, env=env, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    verdict = json.loads(proc.stdout.decode("utf-8"))
    assert verdict["prediction"] == "\udc80" and verdict["gold_parsed"] == "1"
