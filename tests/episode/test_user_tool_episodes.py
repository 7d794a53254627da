"""Episodes that call a user's own tool module: the config's references, the toolbox and
renderer the builders make of them, a real sandbox (local, and served over HTTP), in the
hermes format and (a code-kind tool) in retool."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from fakes import ScriptedEngine

from agent_spo import builders
from agent_spo.config import load_config
from agent_spo.data.problems import Problem
from agent_spo.episode.runner import EpisodeRunner, EpisodeSettings

TOOLS = '''
from tools.sdk import tool

SCALE = 1000


def helper(n):
    return n * SCALE


@tool
def kilo(n: int) -> str:
    """Multiply an integer by a thousand.

    Args:
        n: The integer.
    """
    return str(helper(n))


@tool(kind="code")
def calc(code: str) -> str:
    """Run Python; `from {module} import helper` multiplies by a thousand.

    Args:
        code: The Python code to run.
    """
'''

PROBLEM = Problem("k1", "What is 56 thousand?", "56000", "user:kilo")


@pytest.fixture(scope="module")
def tool_file(tmp_path_factory):
    stem = f"user_tools_{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("user") / f"{stem}.py"
    path.write_text(TOOLS.replace("{module}", stem))
    return path


@pytest.fixture(scope="module")
def verifier():
    from agent_spo.verify import VerifierPool

    with VerifierPool(workers=1, timeout_s=5) as pool:
        yield pool


def _episode(cfg, tok, script, verifier, *, serve: bool = False):
    """One episode of the config's tools through its sandbox (optionally over HTTP)."""
    toolbox = builders.build_toolbox(cfg.rollout)
    renderer = builders.build_renderer(tok, cfg.rollout, toolbox)
    engine = ScriptedEngine(script, tokenizer=tok)

    async def go(sandbox):
        runner = EpisodeRunner(engine, renderer, toolbox, sandbox, verifier, EpisodeSettings())
        return await runner.run(PROBLEM, seed=0)

    async def local():
        async with builders.build_sandbox(cfg.sandbox, cfg.rollout) as sb:
            return await go(sb)

    if not serve:
        return asyncio.run(local()), renderer
    from sandboxes.remote import RemoteSandbox, SandboxServer

    local_sb = builders.build_sandbox(cfg.sandbox, cfg.rollout)
    server = SandboxServer(local_sb, port=0, tools=toolbox.offered()).start()

    async def remote():
        async with RemoteSandbox(server.url, required_tools=toolbox.offered()) as sb:
            await builders.check_sandbox(sb)
            return await go(sb)

    try:
        return asyncio.run(remote()), renderer
    finally:
        server.stop()


@pytest.mark.parametrize("serve", [False, True], ids=["local", "remote"])
def test_a_hermes_episode_calls_the_users_function_tool(tool_file, chat_tokenizer, verifier, serve):
    cfg = load_config(None, [f"rollout.tools=[python,{tool_file}:kilo]", "sandbox.pool_size=1"])
    call = json.dumps({"name": "kilo", "arguments": {"n": 56}})
    script = [f"<tool_call>\n{call}\n</tool_call>", "It is \\boxed{56000}.<|im_end|>"]
    traj, renderer = _episode(cfg, chat_tokenizer, script, verifier, serve=serve)
    assert [t["function"]["name"] for t in renderer.tools] == ["python", "kilo"]
    assert [(c.name, c.observation, c.fault) for c in traj.tool_calls] == [("kilo", "56000", None)]
    assert traj.reward == 1.0 and traj.verdict == "correct"


def test_a_retool_episode_runs_the_users_code_tool_with_its_module_importable(
    tool_file, chat_tokenizer, verifier
):
    cfg = load_config(
        None,
        ["rollout.tool_format=retool", f"rollout.tools=[{tool_file}:calc]", "sandbox.pool_size=1"],
    )
    code = f"from {tool_file.stem} import helper\nx = helper(56)\nprint(x)"
    script = [
        f"<code>\n```python\n{code}\n```\n</code>",
        "<code>\n```python\nprint(x + 0)\n```\n</code>",  # the session kept x
        "So \\boxed{56000}.<|im_end|>",
    ]
    traj, renderer = _episode(cfg, chat_tokenizer, script, verifier)
    assert renderer.tools is None and renderer.fmt.tool == "calc"  # retool shows no schema
    assert [(c.name, c.observation) for c in traj.tool_calls] == [
        ("calc", "56000"),
        ("calc", "56000"),
    ]
    assert traj.reward == 1.0
