"""Token-exact rendering: an episode built turn by turn equals the template's rendering."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_spo.episode.formats import get_format
from agent_spo.episode.render import ChatRenderer, RenderError

SCHEMAS = [{"type": "function", "function": {"name": "python", "parameters": {}}}]

# Text a model might write or a tool might print: digits, words, code, unicode, tags.
text = st.lists(
    st.sampled_from(list("0123456789 abcxyz+-*/=()[]{}\n\t\"'\\_.,:é漢€") + ["<b>", "</", "<|"]),
    min_size=1,
    max_size=40,
).map("".join)


def _ids(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False).input_ids


@pytest.mark.parametrize("thinking", [False, True])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(turns=st.lists(st.tuples(text, text), min_size=0, max_size=3), final=text, problem=text)
def test_hermes_episode_equals_the_template_rendering(
    chat_tokenizer, thinking, turns, final, problem
):
    """prompt + model turns + observations == tokenize(render(whole conversation)).

    Each model turn ends at </tool_call> and the final one at <|im_end|> (single tokens),
    so this holds exactly for any model text and any tool output.
    """
    tok = chat_tokenizer
    r = ChatRenderer(
        tok, get_format("hermes"), tools=SCHEMAS, enable_thinking=None if thinking else False
    )
    ids = r.prompt_ids(problem)
    messages = r.messages(problem)
    for say, output in turns:
        call = (
            say
            + "<tool_call>\n"
            + json.dumps({"name": "python", "arguments": {"code": say}})
            + "\n</tool_call>"
        )
        if thinking:
            call = "<think>\n" + say + "\n</think>\n\n" + call
        ids += _ids(tok, call)
        for seg in r.observation(output):
            assert seg.kind in ("tool", "template") and not seg.trainable
            ids += seg.token_ids
        messages += [{"role": "assistant", "content": call}, {"role": "tool", "content": output}]
    ids += _ids(tok, final) + [tok.eos_token_id]
    messages.append({"role": "assistant", "content": final})
    rendered = r.render(messages, add_generation_prompt=False)
    assert ids == _ids(tok, rendered.removesuffix("\n"))


def test_observation_tokens_split_into_template_and_tool(chat_tokenizer):
    tok = chat_tokenizer
    r = ChatRenderer(tok, get_format("hermes"), tools=SCHEMAS, enable_thinking=False)
    segs = r.observation("56088")
    assert [s.kind for s in segs] == ["template", "tool", "template"]
    assert tok.decode(segs[1].token_ids) == "56088"
    assert tok.decode(segs[0].token_ids).startswith("<|im_end|>")
    assert tok.decode(segs[-1].token_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_retool_observation_is_the_interpreter_block(chat_tokenizer):
    tok = chat_tokenizer
    r = ChatRenderer(tok, get_format("retool"), tools=SCHEMAS)
    segs = r.observation("42")
    text = tok.decode([t for s in segs for t in s.token_ids])
    assert text == "\n<interpreter>\n42\n</interpreter>\n\n"
    assert [s.kind for s in segs] == ["template", "tool", "template"]
    assert r.tools is None  # retool prompts carry no function schemas


def test_prompt_has_system_tools_and_generation_header(chat_tokenizer):
    tok = chat_tokenizer
    r = ChatRenderer(tok, get_format("hermes"), tools=SCHEMAS, enable_thinking=False)
    text = tok.decode(r.prompt_ids("What is 2+2?"))
    assert text.startswith("<|im_start|>system\nSolve the math problem.")
    assert '"name": "python"' in text and "What is 2+2?" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    r2 = ChatRenderer(tok, get_format("hermes"), tools=SCHEMAS, enable_thinking=None)
    assert tok.decode(r2.prompt_ids("q")).endswith("<|im_start|>assistant\n")


def test_a_template_that_rewrites_contents_is_refused(chat_tokenizer):
    import copy

    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(RenderError, match="verbatim"):
        ChatRenderer(tok, get_format("hermes"), tools=SCHEMAS)
