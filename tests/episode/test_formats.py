"""Tool-call formats: parsing what models actually write, and never raising."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_spo.episode.formats import HermesFormat, RetoolFormat, get_format

retool = RetoolFormat()
hermes = HermesFormat()


@pytest.mark.parametrize("turn, code", [
    ("Let me compute.\n<code>\n```python\nprint(2**10)\n```\n</code>", "print(2**10)"),
    ("<code>```py\nx = 1\nx + 1\n```</code>", "x = 1\nx + 1"),
    ("<code>print(1)</code>", "print(1)"),  # no fence at all
    ("<code>\n```\nprint(3)\n```\n</code> trailing", "print(3)"),
    ("<code>a=1</code> then <code>b=2</code>", "a=1"),  # only the first block runs
])  # fmt: skip
def test_retool_parses_the_first_block(turn, code):
    call = retool.parse(turn)
    assert call.name == "python" and call.error is None
    assert call.arguments == {"code": code}
    assert call.raw.startswith("<code>") and call.raw.endswith("</code>")


@pytest.mark.parametrize("turn", [
    "The answer is \\boxed{4}.",
    "<code>\n```python\nprint(1)\n",  # cut off by the token budget: no complete call
    "",
])  # fmt: skip
def test_retool_no_call(turn):
    assert retool.parse(turn) is None


def test_retool_empty_block_is_a_model_error():
    call = retool.parse("<code>\n```python\n```\n</code>")
    assert call.error == "the <code> block is empty" and call.arguments is None


def test_retool_observation_wrapping():
    assert retool.observation("42") == "\n<interpreter>\n42\n</interpreter>\n\n"
    assert retool.stop == ("</code>",)


def test_hermes_parses_json_calls():
    call = hermes.parse(
        'Thinking.\n<tool_call>\n{"name": "factor", "arguments": '
        '{"expression": "x^2-1"}}\n</tool_call>'
    )
    assert (call.name, call.arguments, call.error) == ("factor", {"expression": "x^2-1"}, None)
    # arguments encoded twice, a common model habit
    call = hermes.parse(
        '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"1\\"}"}</tool_call>'
    )
    assert call.arguments == {"code": "1"}


@pytest.mark.parametrize("turn, message", [
    ("<tool_call>{name: factor}</tool_call>", "not valid JSON (Expecting property name"),
    ("<tool_call>[1, 2]</tool_call>", "no tool name"),
    ('<tool_call>{"arguments": {}}</tool_call>', "no tool name"),
    ('<tool_call>{"name": ""}</tool_call>', "no tool name"),
    ("<tool_call>" + "[" * 100000 + "</tool_call>", "not valid JSON"),
])  # fmt: skip
def test_hermes_broken_calls_become_model_errors(turn, message):
    call = hermes.parse(turn)
    assert call.error is not None and message in call.error
    assert "expected <tool_call>" in call.error


def test_get_format():
    assert get_format("retool").name == "retool" and get_format("hermes").name == "hermes"
    with pytest.raises(ValueError, match="allowed: retool, hermes"):
        get_format("xml")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parsers_never_raise(text):
    for fmt in (retool, hermes):
        for candidate in (text, f"<code>{text}</code>", f"<tool_call>{text}</tool_call>"):
            call = fmt.parse(candidate)
            assert call is None or isinstance(call.raw, str)
