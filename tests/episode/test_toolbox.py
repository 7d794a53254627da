"""Toolbox dispatch into the real sandbox, fault labels, and what the model sees."""

import asyncio
import json

import pytest
from typer.testing import CliRunner

from agent_spo.cli import app
from agent_spo.episode.toolbox import Toolbox, render, truncate_middle
from sandboxes.local import Limits, LocalSandbox
from sandboxes.result import ExecResult, infra_result
from tools import builtin_tools


def test_truncate_middle_keeps_head_and_tail():
    text = "a" * 10 + "b" * 10
    # 20 chars into 8: head 4 + tail 4, 12 omitted
    assert truncate_middle(text, 8) == "aaaa\n...(12 characters truncated)...\nbbbb"
    assert truncate_middle("short", 8) == "short"


@pytest.mark.parametrize("result, expected", [
    (ExecResult("ok", stdout="42\n"), "42"),
    (ExecResult("ok"), "[no output]"),
    (ExecResult("ok", stdout="a\n", stderr="warn\n"), "a\nwarn"),
    (ExecResult("error", stdout="x\n", exc_type="ValueError", exc_message="bad",
                traceback="Traceback...\nValueError: bad\n"), "x\nTraceback...\nValueError: bad"),
    (ExecResult("timeout", stdout="p\n", wall_s=3.0), "p\n[timed out after 3.0 s; the call was stopped]"),
    (ExecResult("crashed", signal=11), "[the process crashed (signal 11)]"),
    (ExecResult("ok", stdout="\n\n"), "[no output]"),
    (ExecResult("output_limit", stdout_bytes=10, stderr_bytes=5), "[output limit exceeded after 15 bytes; the call was stopped]"),
])  # fmt: skip
def test_render(result, expected):
    assert render(result) == expected


def test_render_tells_a_session_its_killed_cell_was_rolled_back():
    r = ExecResult("timeout", wall_s=2.0)
    assert render(r, session=True) == (
        "[timed out after 2.0 s; the call was stopped; variables from this call were not kept]"
    )


class _Infra:
    async def run(self, code, *, timeout_s=None):
        return infra_result("sandbox_error", "worker died", "fake")


@pytest.fixture(scope="module")
def pool():
    loop = asyncio.new_event_loop()
    sb = LocalSandbox(workers=1, limits=Limits(timeout_s=5.0))
    loop.run_until_complete(sb.start())
    yield loop, sb
    loop.run_until_complete(sb.close())
    loop.close()


def _call(pool, box, name, args, session=None):
    loop, sb = pool
    return loop.run_until_complete(box.call(name, args, sandbox=sb, session=session))


def test_python_tool_keeps_state_in_the_session(pool):
    loop, sb = pool
    box = Toolbox(builtin_tools())
    session = loop.run_until_complete(sb.open_session())
    assert _call(pool, box, "python", {"code": "n = 6"}, session).observation == "[no output]"
    r = _call(pool, box, "python", '{"code": "n * 7"}', session)
    assert r.ok and r.observation == "42" and r.result.status == "ok"
    loop.run_until_complete(session.close())


@pytest.mark.parametrize("name, args, expected", [
    ("factor", {"expression": "x^3 - x"}, "x*(x - 1)*(x + 1)"),
    ("factor", {"expression": "360"}, "2^3 * 3^2 * 5"),
    ("simplify", {"expression": "sin(x)^2 + cos(x)^2"}, "1"),
    ("expand", {"expression": "(x + 1)^2"}, "x**2 + 2*x + 1"),
    ("solve", {"equations": ["x^2 = 2"]}, "x = -sqrt(2); x = sqrt(2)"),
    ("solve", {"equations": ["x + y = 3", "x - y = 1"], "variables": ["x", "y"]}, "x = 2, y = 1"),
    ("integrate", {"expression": "2x", "lower": "0", "upper": "3"}, "9"),
    ("integrate", {"expression": "cos(x)"}, "sin(x)"),
    ("evaluate", {"expression": "sqrt(2)", "digits": 10}, "1.414213562"),
])  # fmt: skip
def test_math_tools_run_in_the_sandbox(pool, name, args, expected):
    r = _call(pool, Toolbox(builtin_tools()), name, args)
    assert r.ok and r.observation == expected, r


def test_model_faults_never_reach_the_sandbox(pool):
    box = Toolbox(builtin_tools())
    r = _call(pool, box, "calculator", {"x": 1})
    assert (
        r.fault == "model"
        and r.result is None
        and "available tools: python, simplify" in r.observation
    )
    r = _call(pool, box, "factor", {"expr": "x"})
    assert r.fault == "model" and r.result is None
    assert r.observation == "factor: unknown argument 'expr'; allowed: expression"


def test_tool_faults_show_the_error_but_hide_generated_code(pool):
    box = Toolbox(builtin_tools())
    r = _call(pool, box, "python", {"code": "1/0"})
    assert r.fault == "tool" and "ZeroDivisionError: division by zero" in r.observation
    assert 'File "<cell>", line 1' in r.observation  # the model's own code: full traceback
    r = _call(pool, box, "evaluate", {"expression": "1/", "digits": 5})
    assert (
        r.fault == "tool"
        and r.observation.startswith("SyntaxError")
        and "_tool" not in r.observation
    )
    r = _call(pool, box, "integrate", {"expression": "x", "lower": "0"})
    assert (
        r.observation == "ValueError: give both lower and upper for a definite integral, or neither"
    )


def test_observation_is_capped_but_full_output_is_kept(pool):
    box = Toolbox(builtin_tools(), max_output_chars=40)
    r = _call(pool, box, "python", {"code": "print('x' * 500)"})
    assert r.ok and len(r.full_output) == 500
    assert "(460 characters truncated)" in r.observation and len(r.observation) < 100
    assert r.result.stdout == "x" * 500 + "\n"


def test_infrastructure_failures_are_labelled():
    r = asyncio.run(Toolbox(builtin_tools()).call("python", {"code": "1"}, sandbox=_Infra()))
    assert r.fault == "infrastructure" and r.result.infrastructure_failure


runner = CliRunner()


def test_cli_sandbox_run_reads_stdin_and_reports_json():
    r = runner.invoke(app, ["sandbox", "run", "-", "--json"], input="x = 20\nx + 22\n")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["status"] == "ok" and data["stdout"] == "42\n"
    r = runner.invoke(app, ["sandbox", "run", "-"], input="raise ValueError('no')\n")
    assert r.exit_code == 1 and "ValueError: no" in r.stdout


def test_cli_tools_show_and_test():
    r = runner.invoke(app, ["tools", "show", "factor"])
    assert r.exit_code == 0 and json.loads(r.stdout)["function"]["name"] == "factor"
    r = runner.invoke(app, ["tools", "show", "nope"])
    assert r.exit_code == 2 and "unknown tool 'nope'" in r.output
    r = runner.invoke(
        app, ["tools", "test", "factor", "--args", '{"expression": "x^2-1"}', "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["observation"] == "(x - 1)*(x + 1)"
    r = runner.invoke(app, ["tools", "test", "factor", "--args", '{"e": 1}'])
    assert r.exit_code == 2 and "unknown argument 'e'" in r.stdout
    r = runner.invoke(app, ["tools", "list"])
    assert r.exit_code == 0 and "integrate" in r.stdout
