"""The episode runner with a scripted engine and a real sandbox and verifier.

The scripted engine (tests/fakes.py) replays texts (tokenised canonically) with the same
stop semantics as the real engines; it records every context it was given, so the tests
can check that each turn's context is exactly the previous one plus appended tokens.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fakes import ScriptedEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_spo.data.problems import Problem
from agent_spo.demo.demonstrations import call_text
from agent_spo.episode.formats import get_format
from agent_spo.episode.render import ChatRenderer
from agent_spo.episode.rules import RewardRules
from agent_spo.episode.runner import EpisodeDropped, EpisodeRunner, EpisodeSettings

SCHEMAS = [{"type": "function", "function": {"name": "python", "parameters": {}}}]
PROBLEM = Problem("p1", "What is 123 multiplied by 456?", "56088", "synthetic:product:level0")


def call(code: str, fmt: str = "hermes") -> str:
    """A model turn asking for one python call (the demo's own demonstration format)."""
    return call_text(fmt, code)


@pytest.fixture(scope="module")
def sandbox():
    from sandboxes.local import LocalSandbox

    box = LocalSandbox(workers=2)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(box.start())
    yield box, loop
    loop.run_until_complete(box.close())
    loop.close()


@pytest.fixture(scope="module")
def verifier():
    from agent_spo.verify import VerifierPool

    with VerifierPool(workers=1, timeout_s=5) as pool:
        yield pool


def _run(sandbox, verifier, tok, script, *, fmt="hermes", settings_=None, **eng):
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    box, loop = sandbox
    engine = ScriptedEngine(script, tokenizer=tok, version=3, **eng)
    renderer = ChatRenderer(tok, get_format(fmt), tools=SCHEMAS, enable_thinking=False)
    runner = EpisodeRunner(
        engine, renderer, Toolbox(builtin_tools()), box, verifier, settings_ or EpisodeSettings()
    )
    try:
        traj = loop.run_until_complete(runner.run(PROBLEM, seed=1))
    except EpisodeDropped as e:
        return None, engine, runner, e
    return traj, engine, runner, None


def _check_contexts(traj, engine):
    """Each model turn was generated from exactly the record's context before it."""
    k_model = [k for k, s in enumerate(traj.segments) if s.kind == "model"]
    assert len(k_model) == len(engine.contexts)
    for k, ctx in zip(k_model, engine.contexts, strict=True):
        assert list(traj.context_before(k)) == ctx


@pytest.mark.parametrize("fmt", ["hermes", "retool"])
def test_two_calls_with_session_state_then_an_answer(sandbox, verifier, chat_tokenizer, fmt):
    script = [call("N = 123 * 456\nprint(N)", fmt), call("print(N + 0)", fmt),
              "The answer is \\boxed{56088}.<|im_end|>"]  # fmt: skip
    traj, engine, runner, err = _run(sandbox, verifier, chat_tokenizer, script, fmt=fmt)
    assert err is None
    assert traj.stop_reason == "answer" and traj.reward == 1.0 and traj.verdict == "correct"
    assert [c.observation for c in traj.tool_calls] == ["56088", "56088"]  # session state kept
    assert all(c.fault is None and c.status == "ok" for c in traj.tool_calls)
    _check_contexts(traj, engine)
    assert [s.kind for s in traj.segments if s.kind == "model"] == ["model"] * 3
    assert all(s.policy_version == 3 for s in traj.segments if s.kind == "model")
    assert traj.info["gold"] == "56088" and traj.info["prompt_key"] == PROBLEM.key
    assert runner.counters["tool/ok"] == 2


def test_bad_tool_syntax_goes_back_to_the_model(sandbox, verifier, chat_tokenizer):
    script = ["<tool_call>\n{not json}\n</tool_call>", call("1/0"),
              "The answer is \\boxed{7}.<|im_end|>"]  # fmt: skip
    traj, engine, runner, err = _run(sandbox, verifier, chat_tokenizer, script)
    assert err is None and traj.reward == 0.0 and traj.verdict == "incorrect"
    bad, raised = traj.tool_calls
    assert bad.fault == "model" and "not valid JSON" in bad.observation
    assert raised.fault == "tool" and "ZeroDivisionError" in raised.observation
    assert runner.counters["tool/model"] == 1 and runner.counters["tool/tool"] == 1
    _check_contexts(traj, engine)


def test_max_turns_stops_before_running_the_last_call(sandbox, verifier, chat_tokenizer):
    script = [call("print(1)"), call("print(2)"), call("print(3)")]
    s = EpisodeSettings(max_turns=2)
    traj, engine, _, _ = _run(sandbox, verifier, chat_tokenizer, script, settings_=s)
    assert traj.stop_reason == "max_turns" and len(traj.tool_calls) == 1
    assert traj.reward == 0.0 and traj.verdict == "no_answer"  # scored: the model's doing
    single = EpisodeSettings(max_turns=1)
    traj, engine, _, _ = _run(sandbox, verifier, chat_tokenizer, script, settings_=single)
    assert len(engine.contexts) == 1 and traj.tool_calls == ()


def test_token_budget_truncates_and_scores_zero(sandbox, verifier, chat_tokenizer):
    script = [call("print(5)"), "The answer is " + "very " * 50 + "\\boxed{56088}.<|im_end|>"]
    s = EpisodeSettings(max_response_tokens=40)
    traj, engine, _, _ = _run(sandbox, verifier, chat_tokenizer, script, settings_=s)
    assert traj.stop_reason == "budget" and traj.num_model_tokens == 40
    assert traj.reward == 0.0


def test_context_limit(sandbox, verifier, chat_tokenizer):
    renderer = ChatRenderer(
        chat_tokenizer, get_format("hermes"), tools=SCHEMAS, enable_thinking=False
    )
    n_prompt = len(renderer.prompt_ids(PROBLEM.problem))
    script = [call("print('x' * 200)"), "The answer is \\boxed{56088}.<|im_end|>"]
    traj, engine, _, _ = _run(
        sandbox, verifier, chat_tokenizer, script, max_model_len=n_prompt + 40
    )
    assert traj.stop_reason == "context"
    assert len(traj.token_ids) <= n_prompt + 40


def test_engine_failure_is_retried_then_dropped(sandbox, verifier, chat_tokenizer):
    script = [call("print(1)"), "The answer is \\boxed{56088}.<|im_end|>"]
    s = EpisodeSettings(retries=2)
    traj, engine, runner, err = _run(
        sandbox, verifier, chat_tokenizer, script, settings_=s, fail_at={0}
    )
    assert err is None and traj.info["attempt"] == 1 and traj.reward == 1.0
    assert runner.counters["dropped/engine"] == 1 and runner.counters["retried"] == 1
    traj, engine, runner, err = _run(
        sandbox, verifier, chat_tokenizer, script, settings_=s, fail_at=set(range(10))
    )
    assert traj is None and err.source == "engine" and "scripted engine failure" in str(err)
    assert runner.counters["dropped/engine"] == 3 and runner.counters["retried"] == 2
    assert runner.counters["episodes"] == 0  # never scored


def test_sandbox_failure_drops_and_the_session_is_closed(sandbox, verifier, chat_tokenizer):
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    box, loop = sandbox
    closed = []

    class DeadSession:
        async def run(self, code, timeout_s=None):
            from sandboxes.result import infra_result

            return infra_result("session_lost", "the session's process died")

        async def close(self):
            closed.append(True)

    class Box:
        async def open_session(self):
            return DeadSession()

        async def run(self, code, timeout_s=None):
            return await box.run(code, timeout_s=timeout_s)

    engine = ScriptedEngine([call("print(1)")] * 5, tokenizer=chat_tokenizer, version=3)
    renderer = ChatRenderer(chat_tokenizer, get_format("hermes"), tools=SCHEMAS)
    runner = EpisodeRunner(engine, renderer, Toolbox(builtin_tools()), Box(), verifier,
                           EpisodeSettings(retries=1))  # fmt: skip
    with pytest.raises(EpisodeDropped) as e:
        loop.run_until_complete(runner.run(PROBLEM))
    assert e.value.source == "sandbox"
    assert closed == [True, True]  # one session per attempt, each closed
    assert runner.counters["dropped/sandbox"] == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runner(tok, sandbox_, verifier, script, **settings_):
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    engine = ScriptedEngine(script, tokenizer=tok, version=3)
    renderer = ChatRenderer(tok, get_format("hermes"), tools=SCHEMAS)
    runner = EpisodeRunner(engine, renderer, Toolbox(builtin_tools()), sandbox_, verifier,
                           EpisodeSettings(**settings_))  # fmt: skip
    return runner, engine


@pytest.mark.parametrize("backend", ["remote_unreachable", "local_not_started"])
def test_a_sandbox_that_cannot_open_a_session_drops_and_counts(
    sandbox, verifier, chat_tokenizer, backend
):
    """Real backends failing in their own way (SandboxError): dropped, counted, retried."""
    from sandboxes.errors import SandboxError
    from sandboxes.local import LocalSandbox
    from sandboxes.remote import RemoteSandbox

    _, loop = sandbox
    if backend == "remote_unreachable":  # nothing listens on the port: connection refused
        box = RemoteSandbox(f"http://127.0.0.1:{_free_port()}", retries=0)
        loop.run_until_complete(box.start())
    else:
        box = LocalSandbox(workers=1)  # never started
    runner, engine = _runner(chat_tokenizer, box, verifier, [call("print(1)")] * 3, retries=1)
    try:
        with pytest.raises(EpisodeDropped) as e:
            loop.run_until_complete(runner.run(PROBLEM))
    finally:
        loop.run_until_complete(box.close())
    assert e.value.source == "sandbox" and "could not open a session" in e.value.reason
    assert isinstance(e.value.__cause__, SandboxError)
    assert runner.counters["dropped/sandbox"] == 2 and runner.counters["retried"] == 1
    assert len(engine.contexts) == 2  # one model turn per attempt, then the open failed


@pytest.mark.parametrize("where", ["open_session", "session.run", "toolbox"])
def test_a_bug_on_the_sandbox_path_propagates_and_is_not_a_drop(
    sandbox, verifier, chat_tokenizer, where
):
    """A TypeError is a bug, not infrastructure (STYLE rule 23): it stops the run on the
    first attempt with its traceback; nothing is retried or counted as dropped."""
    from agent_spo.episode.toolbox import Toolbox

    box, loop = sandbox
    closed = []

    class OldSession:  # a session written against an old interface: no timeout_s
        async def run(self, code):
            raise AssertionError("never reached: the call itself is the TypeError")

        async def close(self):
            closed.append(True)

    class Box:
        async def open_session(self):
            if where == "open_session":
                return await box.open_session(timeout_s=5)  # no such argument
            if where == "session.run":
                return OldSession()
            return await box.open_session()

        async def run(self, code, timeout_s=None):
            return await box.run(code, timeout_s=timeout_s)

    class BuggyToolbox(Toolbox):
        async def call(self, name, arguments, **kw):
            return await super().call(name, arguments, **kw) + 1  # a result is not a number

    runner, engine = _runner(chat_tokenizer, Box(), verifier, [call("print(1)")] * 3, retries=2)
    if where == "toolbox":
        from tools import builtin_tools

        runner.toolbox = BuggyToolbox(builtin_tools())
    with pytest.raises(TypeError):
        loop.run_until_complete(runner.run(PROBLEM))
    assert len(engine.contexts) == 1  # the first attempt only
    assert not any(k.startswith(("dropped/", "retried", "episodes")) for k in runner.counters)
    if where == "session.run":
        assert closed == [True]  # the session is closed on the way out all the same
    assert loop.run_until_complete(box.census())["sessions"] == 0  # no session leaked


def test_a_session_that_fails_to_close_is_counted_not_raised(sandbox, verifier, chat_tokenizer):
    from sandboxes.errors import SandboxError

    box, loop = sandbox

    class Unclosable:
        def __init__(self, inner):
            self.inner = inner

        async def run(self, code, timeout_s=None):
            return await self.inner.run(code, timeout_s=timeout_s)

        async def close(self):
            await self.inner.close()
            raise SandboxError("the session's worker died while closing it")

    class Box:
        async def open_session(self):
            return Unclosable(await box.open_session())

        async def run(self, code, timeout_s=None):
            return await box.run(code, timeout_s=timeout_s)

    script = [call("print(123 * 456)"), "The answer is \\boxed{56088}.<|im_end|>"]
    runner, _ = _runner(chat_tokenizer, Box(), verifier, script)
    traj = loop.run_until_complete(runner.run(PROBLEM))
    assert traj.reward == 1.0 and runner.counters["sandbox/close_failed"] == 1


tool_output = st.text(alphabet="0123456789abc \n<>/", min_size=0, max_size=400)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    outputs=st.lists(tool_output, min_size=1, max_size=4),
    budget=st.integers(5, 300),
    max_turns=st.integers(1, 6),
    fmt=st.sampled_from(["hermes", "retool"]),
)
def test_token_invariants_hold_for_any_outputs_and_budgets(
    sandbox, verifier, chat_tokenizer, outputs, budget, max_turns, fmt
):
    """Random tool outputs, truncations and budgets: contexts extend, masks and limits hold."""
    script = [call(f"print({json.dumps(o)})", fmt) for o in outputs]
    script.append("The answer is \\boxed{56088}.<|im_end|>")
    s = EpisodeSettings(max_response_tokens=budget, max_turns=max_turns)
    traj, engine, _, err = _run(sandbox, verifier, chat_tokenizer, script, fmt=fmt, settings_=s)
    assert err is None
    _check_contexts(traj, engine)
    assert traj.num_model_tokens <= budget
    assert len(engine.contexts) <= max_turns
    assert traj.stop_reason in ("answer", "max_turns", "budget", "context")
    mask = traj.loss_mask
    assert len(mask) == len(traj.response_token_ids) == len(traj.logprobs)
    assert sum(mask) == traj.num_model_tokens
    for c in traj.tool_calls:  # what the model saw is capped head + tail
        assert len(c.observation) <= 256 + 60
    if traj.reward is not None:
        assert traj.reward in (0.0, 1.0)


def test_budget_spent_on_a_call_turn_does_not_run_the_tool(sandbox, verifier, chat_tokenizer):
    text = call("print(1)")
    n = len(chat_tokenizer(text, add_special_tokens=False).input_ids)
    s = EpisodeSettings(max_response_tokens=n)  # the call uses the whole budget
    traj, engine, _, _ = _run(sandbox, verifier, chat_tokenizer, [text], settings_=s)
    assert traj.stop_reason == "budget" and traj.tool_calls == ()
    assert traj.verdict == "no_answer" and traj.reward == 0.0


def test_a_prompt_over_the_context_limit_is_dropped_without_retry(
    sandbox, verifier, chat_tokenizer
):
    traj, engine, runner, err = _run(
        sandbox, verifier, chat_tokenizer, ["x"], max_model_len=10,
        settings_=EpisodeSettings(retries=3),
    )  # fmt: skip
    assert traj is None and err.source == "prompt" and "context limit is 10" in str(err)
    assert engine.contexts == [] and runner.counters["dropped/prompt"] == 1
    assert runner.counters["retried"] == 0


def test_the_deadline_keeps_the_episode_but_does_not_score_it(sandbox, verifier, chat_tokenizer):
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    box, loop = sandbox
    script = [call("print(1)"), "The answer is \\boxed{56088}.<|im_end|>"]
    engine = ScriptedEngine(script, tokenizer=chat_tokenizer, version=3, delays={1: 0.5})
    renderer = ChatRenderer(chat_tokenizer, get_format("hermes"), tools=SCHEMAS)
    runner = EpisodeRunner(engine, renderer, Toolbox(builtin_tools()), box, verifier,
                           EpisodeSettings(deadline_s=0.3))  # fmt: skip
    traj = loop.run_until_complete(runner.run(PROBLEM))
    assert traj.stop_reason == "deadline" and traj.reward is None
    assert len(traj.tool_calls) == 1  # what happened before the deadline is kept
    # nothing finished at all: dropped, and not retried (it would only time out again)
    engine = ScriptedEngine(["never"] * 3, tokenizer=chat_tokenizer, version=3, delays={0: 0.5})
    runner = EpisodeRunner(engine, renderer, Toolbox(builtin_tools()), box, verifier,
                           EpisodeSettings(deadline_s=0.2, retries=2))  # fmt: skip
    with pytest.raises(EpisodeDropped) as e:
        loop.run_until_complete(runner.run(PROBLEM))
    assert e.value.source == "deadline" and runner.counters["retried"] == 0


THINK_RULES = EpisodeSettings(
    rules=RewardRules(one_think_close=True, no_tool_call_after_think=True)
)


@pytest.mark.parametrize(
    "script, reason",
    [
        # thinks with a tool, closes once, answers: the reference's well-formed response
        ([f"<think>\nLet me compute.\n{call('print(123 * 456)')}",
          "So it is 56088.\n</think>\n\nThe answer is \\boxed{56088}.<|im_end|>"], None),
        # right answer, but the thinking is never closed
        (["<think>\nIt is 56088. The answer is \\boxed{56088}.<|im_end|>"],
         "reward.one_think_close: 0 </think> tags, exactly one is required"),
        # closed twice
        (["<think>a</think> <think>b</think> The answer is \\boxed{56088}.<|im_end|>"],
         "reward.one_think_close: 2 </think> tags, exactly one is required"),
        # a tool call after the thinking was closed (in the same turn)
        ([f"<think>\nok\n</think>\n{call('print(123 * 456)')}",
          "The answer is \\boxed{56088}.<|im_end|>"],
         "reward.no_tool_call_after_think: a tool call after </think>"),
    ],
)  # fmt: skip
def test_the_reference_reward_conditions_turn_a_right_answer_to_zero(
    sandbox, verifier, chat_tokenizer, script, reason
):
    traj, _, _, err = _run(sandbox, verifier, chat_tokenizer, script, settings_=THINK_RULES)
    assert err is None
    if reason is None:
        assert traj.reward == 1.0 and traj.verdict == "correct"
    else:
        assert traj.reward == 0.0 and traj.verdict == "incorrect"
        assert traj.info["verdict_reason"] == reason
        assert traj.answer == "56088"  # the answer itself was right: the reason says why 0


def test_the_reward_conditions_are_off_by_default(sandbox, verifier, chat_tokenizer):
    script = ["<think>a</think> <think>b</think> The answer is \\boxed{56088}.<|im_end|>"]
    traj, _, _, _ = _run(sandbox, verifier, chat_tokenizer, script)
    assert traj.reward == 1.0
