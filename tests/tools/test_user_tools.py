"""Tools a user writes in their own files and packages: references, checks before any
work, the real sandbox (local jail, unisolated, served over HTTP), faults, state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from agent_spo.episode.toolbox import Toolbox
from sandboxes.errors import SandboxUnavailable
from sandboxes.local import Limits, LocalSandbox
from tools.refs import ToolReferenceError, ToolSource, absolute, offer, resolve

HEADER = "from tools.sdk import tool\n\n"

LOOKUP = '''
@tool
def lookup(key: str) -> str:
    """Look up a constant by name.

    Args:
        key: The constant's name, e.g. "answer".
    """
    return {"answer": "42"}.get(key, f"no constant named {key!r}")
'''

TUPLE_DEFAULT = '''

@tool
def picks(xs: list[int] = (1, 2)) -> str:
    """Sum some numbers.

    Args:
        xs: The numbers.
    """
    return str(sum(xs))
'''

FAULTS = '''
import time

_calls = 0


@tool
def raises(x: int) -> str:
    """Divide 1 by x.

    Args:
        x: The divisor.
    """
    return str(1 / x)


@tool
def hangs(s: float) -> str:
    """Sleep.

    Args:
        s: Seconds.
    """
    time.sleep(s)
    return "woke"


@tool
def hogs(mb: int) -> str:
    """Allocate memory.

    Args:
        mb: MiB.
    """
    return str(len(bytearray(mb << 20)))


@tool
def chatty(n: int) -> str:
    """Print a lot.

    Args:
        n: Characters.
    """
    print("x" * n)
    return "done"


@tool
def nothing(x: int) -> str:
    """Return nothing.

    Args:
        x: Ignored.
    """


@tool
def mapping(x: int) -> str:
    """Return a dict.

    Args:
        x: A number.
    """
    return {"x": x, "squares": [x * x]}


@tool(stateful=True)
def counter(step: int = 1) -> str:
    """Count this episode's calls.

    Args:
        step: How much to add.
    """
    global _calls
    _calls += step
    return f"count {_calls}"
'''


def module(tmp_path: Path, body: str, *, stem: str | None = None, header: str = HEADER) -> Path:
    """A tool file with a unique module name (each test imports its own)."""
    path = tmp_path / f"{stem or 'ut_' + uuid.uuid4().hex[:8]}.py"
    path.write_text(header + textwrap.dedent(body))
    return path


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


# ----------------------------------------------------------------------- references
def test_a_file_a_function_and_a_package_resolve_to_their_tools(tmp_path):
    path = module(tmp_path, LOOKUP + FAULTS)
    whole = resolve(["python", str(path)])
    assert [t.name for t in whole.tools][:3] == ["python", "lookup", "raises"]
    assert whole.origin["lookup"] == str(path) and whole.origin["python"] == "python"
    assert [(s.module, s.path) for s in whole.sources] == [(path.stem, str(path))]
    one = resolve([f"{path}:counter"])
    assert [t.name for t in one.tools] == ["counter"] and one.tools[0].stateful
    pkg = tmp_path / f"pkg_{uuid.uuid4().hex[:6]}"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mine.py").write_text(HEADER + LOOKUP)
    found = resolve([f"{pkg.name}.sub.mine:lookup"], base=tmp_path)  # beside the config
    assert [t.name for t in found.tools] == ["lookup"]
    assert [(s.module, s.path, s.name) for s in found.sources] == [
        (f"{pkg.name}.sub.mine", str(pkg), pkg.name)
    ]
    # an installed module needs nothing shown (the sandbox sees the environment), but is
    # still imported at the sandbox's start
    assert resolve(["tools.algebra:factor"]).sources == [ToolSource("tools.algebra", None)]
    assert LocalSandbox(tool_sources=resolve(["tools.algebra:factor"]).sources)._hello["config"][
        "require"
    ] == ["tools.algebra"]


def test_a_plain_directory_is_refused_and_a_missing_import_is_named(tmp_path):
    """A dotted reference through a directory without __init__.py would show the whole
    directory to the sandbox (a home directory, say): refused, not bound."""
    home = tmp_path / f"home_{uuid.uuid4().hex[:6]}"
    (home / "proj").mkdir(parents=True)
    (home / "proj" / "mine.py").write_text(HEADER + LOOKUP)
    with pytest.raises(ToolReferenceError, match="is a plain directory .* add an __init__.py"):
        resolve([f"{home.name}.proj.mine:lookup"], base=tmp_path)
    broken = tmp_path / f"bk_{uuid.uuid4().hex[:6]}.py"
    broken.write_text("import missing_module_xyz\n")
    with pytest.raises(ToolReferenceError, match="No module named 'missing_module_xyz'"):
        resolve([broken.stem], base=tmp_path)


def test_a_relative_file_reference_is_recorded_absolute(tmp_path, monkeypatch):
    path = module(tmp_path, LOOKUP)
    monkeypatch.chdir(tmp_path)
    assert absolute(f"{path.name}:lookup") == f"{path}:lookup"
    assert absolute(path.name) == str(path) and absolute("python") == "python"
    assert absolute("mypkg.tools:x") == "mypkg.tools:x"


@pytest.mark.parametrize(
    ("body", "stem", "ref_tail", "message"),
    [
        (LOOKUP, None, ":missing", "has no 'missing'; its tools: lookup"),
        ("X = 1\n", None, ":X", "'X' is a int, not a tool; decorate it with @tool"),
        ("def f():\n    pass\n", None, "", "defines no @tool function"),
        ("import no_such_package_xyz\n", None, "", "ModuleNotFoundError.*pip install "
         "no_such_package_xyz"),
        ("raise RuntimeError('boom at import')\n", None, "", "RuntimeError: boom at import"),
        ('@tool\ndef f(x):\n    """Doc.\n\n    Args:\n        x: X.\n    """\n', None, "",
         "has no type hint.*cannot be given this tool's schema"),
        ('@tool\ndef f(x: float = float("nan")) -> str:\n    """Doc.\n\n    Args:\n'
         '        x: X.\n    """\n', None, "", "not JSON the model can receive"),
        ('def make():\n    @tool\n    def inner(x: int) -> str:\n        """Doc.\n\n'
         '        Args:\n            x: X.\n        """\n    return inner\n\nbuilt = make()\n',
         None, ":built", "must be defined at the top level"),
        (LOOKUP, "tabnanny", "", "would shadow the module 'tabnanny'"),
        (LOOKUP, "json", "", "a module named 'json' is already imported"),
        (LOOKUP, "tools", "", "the sandbox's own"),
        (LOOKUP, "bad-name", "", "cannot be imported as a module"),
    ],
)  # fmt: skip
def test_a_reference_that_cannot_be_used_is_refused_by_name(
    tmp_path, body, stem, ref_tail, message
):
    ref = str(module(tmp_path, body, stem=stem)) + ref_tail
    with pytest.raises(ToolReferenceError, match=message) as e:
        resolve([ref])
    assert repr(ref) in str(e.value)


def test_missing_references_and_clashes(tmp_path):
    with pytest.raises(ToolReferenceError, match=r"no file '.*nope\.py'"):
        resolve([str(tmp_path / "nope.py")])
    with pytest.raises(ToolReferenceError, match="unknown tool 'pyhton': not a built-in"):
        resolve(["pyhton"])
    a, b = module(tmp_path, LOOKUP), module(tmp_path, LOOKUP)
    with pytest.raises(ToolReferenceError, match="offers a tool named 'lookup', and so does"):
        resolve([str(a), str(b)])
    factor = module(tmp_path, LOOKUP.replace("def lookup", "def factor"))
    with pytest.raises(ToolReferenceError, match="named 'factor', and so does 'factor'"):
        resolve(["factor", str(factor)])


def test_the_config_names_the_key_and_the_reference_before_any_work(tmp_path):
    from agent_spo.config import ConfigError, load_config

    path = module(tmp_path, LOOKUP)
    cfg = load_config(None, [f"rollout.tools=[python,{path}:lookup]"])
    assert cfg.rollout.tools == ["python", f"{path}:lookup"]
    with pytest.raises(ConfigError, match=r"rollout.tools: tool reference .*no file"):
        load_config(None, [f"rollout.tools=[python,{tmp_path}/gone.py]"])
    code = module(tmp_path, '@tool(kind="code")\ndef calc(code: str) -> str:\n'
                            '    """Run Python.\n\n    Args:\n        code: The code.\n    """\n')  # fmt: skip
    with pytest.raises(ConfigError, match="retool: a <code> block calls one code tool"):
        load_config(None, ["rollout.tool_format=retool", f"rollout.tools=[python,{code}]"])


# ------------------------------------------------------------------------ the sandbox
@pytest.fixture(scope="module")
def faults_box(tmp_path_factory):
    """A one-worker jail showing a fault-laden tool module, and its toolbox."""
    path = module(tmp_path_factory.mktemp("faults"), FAULTS)
    found = resolve(["python", str(path)])
    loop = asyncio.new_event_loop()
    sb = LocalSandbox(
        workers=1, limits=Limits(timeout_s=2, memory_mb=512), tool_sources=found.sources
    )
    loop.run_until_complete(sb.start())
    yield sb, Toolbox(found.tools, max_output_chars=200), loop
    loop.run_until_complete(sb.close())
    loop.close()


def test_faults_reach_the_model_as_observations_and_the_session_survives(faults_box):
    sb, box, loop = faults_box

    async def go():
        async with await sb.open_session() as s:
            out = {}
            for name, args in [
                ("counter", {}), ("raises", {"x": 0}), ("hangs", {"s": 30}),
                ("hogs", {"mb": 4096}), ("chatty", {"n": 2_000_000}), ("nothing", {"x": 1}),
                ("mapping", {"x": 3}), ("counter", {"step": 2}),
            ]:  # fmt: skip
                out[name] = await box.call(name, args, sandbox=sb, session=s, timeout_s=2)
            return out

    out = loop.run_until_complete(go())
    assert out["raises"].observation == "ZeroDivisionError: division by zero"
    assert "timed out after" in out["hangs"].observation
    assert "MemoryError" in out["hogs"].observation
    assert "output limit exceeded" in out["chatty"].observation
    assert len(out["chatty"].observation) < 300  # capped for the model
    assert out["nothing"].observation == (
        "ToolReturnError: tool 'nothing' returned None; a tool returns its result (a string)"
    )
    for name in ("raises", "hangs", "hogs", "chatty", "nothing"):
        assert out[name].fault == "tool", name  # the tool's fault: never infrastructure
    assert out["mapping"].ok and json.loads(out["mapping"].observation) == {"x": 3, "squares": [9]}
    assert out["counter"].observation == "count 3"  # the session kept the module's state


def test_a_stateful_tool_keeps_state_per_episode_and_leaves_the_models_names(faults_box):
    sb, box, loop = faults_box

    async def episode():
        async with await sb.open_session() as s:
            seen = [
                (await box.call("counter", {}, sandbox=sb, session=s)).observation for _ in range(3)
            ]
            cell = '{"code": "_tool = 7\\n_json = 8\\nprint(_tool + _json)"}'
            await box.call("python", cell, sandbox=sb, session=s)
            await box.call("counter", {}, sandbox=sb, session=s)
            again = await box.call("python", '{"code": "print(_tool + _json)"}', sandbox=sb,
                                   session=s)  # fmt: skip
            return seen, again.observation

    assert loop.run_until_complete(episode()) == (["count 1", "count 2", "count 3"], "15")
    assert loop.run_until_complete(episode())[0] == ["count 1", "count 2", "count 3"]
    # stateless (no session given): a fresh process each call
    calls = [loop.run_until_complete(box.call("counter", {}, sandbox=sb)) for _ in range(2)]
    assert [c.observation for c in calls] == ["count 1", "count 1"]


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
def test_the_jail_shows_the_module_read_only_and_nothing_beside_it(tmp_path, isolation):
    (tmp_path / "secret.txt").write_text("do not read")
    path = module(tmp_path, LOOKUP + "\nimport os\nHERE = os.path.dirname(__file__)\n")
    found = resolve([str(path)])
    box = Toolbox([*resolve(["python"]).tools, *found.tools])

    async def go():
        sb = LocalSandbox(workers=1, isolation=isolation, tool_sources=found.sources)
        async with sb:
            answer = await box.call("lookup", {"key": "answer"}, sandbox=sb)
            probe = (
                f"import {path.stem} as m, os\nprint(sorted(os.listdir(m.HERE)))\n"
                f"open(m.__file__, 'a')"
            )
            seen = await box.call("python", {"code": probe}, sandbox=sb)
            return answer, seen

    answer, seen = run(go())
    assert answer.ok and answer.observation == "42"
    if isolation == "bwrap":  # the jail shows the file alone, read-only
        assert str(sorted([path.name, "sandboxes", "tools"])) in seen.observation
        assert "Read-only file system" in seen.observation
    else:  # the unisolated opt-in: the module imports from its own directory
        assert "secret.txt" in seen.observation


def test_a_module_that_imports_on_the_host_but_not_in_the_jail_fails_the_start(tmp_path):
    data = tmp_path / "table.txt"
    data.write_text("1 2 3")
    path = module(tmp_path, LOOKUP + f"\nTABLE = open({str(data)!r}).read()\n")
    found = resolve([str(path)])  # fine on the host

    async def go():
        async with LocalSandbox(workers=1, tool_sources=found.sources):
            pass

    with pytest.raises(SandboxUnavailable, match=rf"{path.stem}: FileNotFoundError.*environment"):
        run(go())


def test_a_served_sandbox_carries_the_tools_and_a_client_checks_them(tmp_path):
    from agent_spo.builders import check_sandbox
    from sandboxes.errors import SandboxCheckFailed
    from sandboxes.remote import RemoteSandbox, SandboxServer

    path = module(tmp_path, LOOKUP + TUPLE_DEFAULT)
    found = resolve(["python", str(path)])
    mine = offer(found.tools)
    local = LocalSandbox(workers=1, tool_sources=found.sources)
    server = SandboxServer(local, port=0, tools=mine).start()  # starts and closes it
    try:

        async def go(required):
            async with RemoteSandbox(server.url, required_tools=required) as sb:
                await check_sandbox(sb)
                return await Toolbox(found.tools).call("lookup", {"key": "answer"}, sandbox=sb)

        # straight from the Tool objects: a tuple default equals the server's JSON list
        raw = [{"schema": t.schema(), "target": None if t.kind == "code" else
                f"{t.module}:{t.fn.__name__}"} for t in found.tools]  # fmt: skip
        assert raw[2]["schema"]["function"]["parameters"]["properties"]["xs"]["default"] == (1, 2)
        assert run(go(raw)).observation == "42"
        other = module(tmp_path, LOOKUP.replace("def lookup", "def other"))
        wanted = mine + offer(resolve([str(other)]).tools)
        with pytest.raises(SandboxCheckFailed, match=r"lacks the tools \['other'\].*the server's"):
            run(go(wanted))
        changed = json.loads(json.dumps(mine))
        changed[1]["schema"]["function"]["description"] = "Look up something else."
        with pytest.raises(SandboxCheckFailed, match=r"has other versions of \['lookup'\]"):
            run(go(changed))
        moved = json.loads(json.dumps(mine))  # the same schema from another module
        moved[1]["target"] = "elsewhere:lookup"
        with pytest.raises(SandboxCheckFailed, match=r"other versions of \['lookup'\].*module"):
            run(go(moved))
    finally:
        server.stop()


def test_a_server_offers_the_builtins_by_default_and_an_old_one_is_refused():
    from agent_spo.builders import _check_offered_tools
    from sandboxes.errors import SandboxCheckFailed
    from sandboxes.remote import SandboxServer

    factor = offer(resolve(["factor"]).tools)
    server = SandboxServer(LocalSandbox(workers=1), port=0)  # not started: no workers
    _check_offered_tools("http://x", factor, server.tools)
    server.httpd.server_close()
    with pytest.raises(SandboxCheckFailed, match="does not list its tools"):
        _check_offered_tools("http://x", factor, None)


def test_docker_containers_mount_the_tool_modules_read_only(tmp_path):
    from sandboxes.docker import ContainerSpec, DockerSandbox, container_kwargs

    path = module(tmp_path, LOOKUP)
    found = resolve([str(path)])
    sb = DockerSandbox(workers=1, tool_sources=found.sources)
    assert sb.spec.sources == ((path.name, str(path)),)
    (mount,) = container_kwargs(sb.spec, "x")["mounts"]
    assert (mount["Source"], mount["Target"], mount["Type"], mount["ReadOnly"]) == (
        str(path), f"/sbx/{path.name}", "bind", True,
    )  # fmt: skip
    assert "mounts" not in container_kwargs(ContainerSpec(), "x")
    assert sb._hello["config"]["require"] == [path.stem]  # fails the start if it cannot import


# --------------------------------------------------------------------------------- CLI
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, however it is installed


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent_spo.cli", *args], cwd=cwd, env=ENV, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def test_the_template_passes_its_own_test_and_the_cli_takes_references(tmp_path):
    r = _cli("tools", "new", "digits", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "digits.py").exists() and (tmp_path / "test_digits.py").exists()
    assert _cli("tools", "new", "digits", cwd=tmp_path).returncode == 2  # no overwrite
    assert "is taken" in _cli("tools", "new", "python", cwd=tmp_path).stderr
    assert "importable module" in _cli("tools", "new", "math", cwd=tmp_path).stderr
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_digits.py"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert tests.returncode == 0 and "3 passed" in tests.stdout, tests.stdout + tests.stderr
    r = _cli("tools", "test", "digits.py", "--args", '{"n": 2024, "base": 7}', "--json",
             cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["observation"] == (
        "5621 in base 7; digit sum 14"
    )
    schema = json.loads(_cli("tools", "show", "digits.py:digits", cwd=tmp_path).stdout)
    assert schema["function"]["parameters"]["required"] == ["n"]
    listed = _cli("tools", "list", "digits.py", cwd=tmp_path).stdout
    assert "digits.py" in listed and "factor" in listed
    bad = _cli("tools", "test", "digits.py:nope", cwd=tmp_path)
    assert bad.returncode == 2 and "has no 'nope'" in bad.stderr


def test_the_tool_demo_is_refused_before_work_when_it_cannot_run(tmp_path):
    from agent_spo.config import ConfigError, load_config
    from agent_spo.tool_template import TEMPLATE

    digits = tmp_path / f"dg_{uuid.uuid4().hex[:8]}.py"
    digits.write_text(TEMPLATE.replace("NAME", digits.stem))
    ok = [f"model.demo_tool={digits}", f"rollout.tools=[python,{digits}]"]
    assert load_config(None, ok).model.demo_tool == str(digits)
    for extra, message in [
        (["rollout.tools=[python]"], "the run must offer the tool"),
        (["model.path=/x"], "set model.path null"),
        (["rollout.tool_format=retool"], "uses tool_format hermes"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*ok, *extra])
    lookup = module(tmp_path, LOOKUP)
    with pytest.raises(ConfigError, match=r"model.demo_tool: .*integers n and base.*key: string"):
        load_config(None, [f"model.demo_tool={lookup}", f"rollout.tools=[python,{lookup}]"])


def test_the_tool_demo_refuses_a_tool_with_other_required_arguments_or_that_fails(tmp_path):
    from agent_spo.config import ConfigError, load_config
    from agent_spo.data.synthetic import make_tasks
    from agent_spo.demo.tool_demo import check_demo_tool, sandbox_outputs
    from agent_spo.tool_template import TEMPLATE

    extra = tmp_path / f"dx_{uuid.uuid4().hex[:8]}.py"
    extra.write_text(
        TEMPLATE.replace("NAME", extra.stem)
        .replace("base: int = 10) -> str:", "base: int = 10, label: str = '') -> str:")
        .replace("        base: The base", "        label: A label.\n        base: The base")
    )
    check_demo_tool(str(extra))  # an optional extra argument is fine
    strict = tmp_path / f"ds_{uuid.uuid4().hex[:8]}.py"
    strict.write_text(extra.read_text().replace("n: int, base: int = 10, label: str = ''",
                                                "label: str, n: int, base: int = 10"))  # fmt: skip
    with pytest.raises(ConfigError, match="with the integers n and base only"):
        load_config(None, [f"model.demo_tool={strict}", f"rollout.tools=[python,{strict}]"])
    tasks = make_tasks(20, seed=2, families=("base_digits",))
    outs = sandbox_outputs(str(extra), check_demo_tool(str(extra)), tasks, chunk=7)
    assert len(outs) == 20 and all("digit sum" in o for o in outs)  # ran in the sandbox
    picky = tmp_path / f"dp_{uuid.uuid4().hex[:8]}.py"
    picky.write_text(TEMPLATE.replace("NAME", picky.stem).replace(
        "    if n < 0:", "    if base == 7:\n        raise ValueError('no sevens')\n    if n < 0:"
    ))  # fmt: skip
    sevens = [p for p in tasks if p.problem.endswith("base 7?")]
    assert sevens
    with pytest.raises(ValueError, match=r"called dp_\w+\(n=\d+, base=7\).*ValueError: no sevens"):
        sandbox_outputs(str(picky), check_demo_tool(str(picky)), tasks)
