"""The demo tokenizer: a small byte-level BPE trained here with `tokenizers`, and a
Qwen3-style chat template with tool calling and thinking tags.

Numbers are cut into groups of up to three digits from the left (as GPT-4- and Llama-3-style
tokenizers do; Qwen splits single digits), and the training corpus covers every group, so
a 3-digit number is one token. With tied embeddings, copying a number from the problem or
from a tool's output is then a lookup of one or a few tokens, which a ~1M-parameter model
learns in minutes; digit-by-digit copying needs far more training. The chat markers and tool tags are single added tokens, so a turn that stops at
``</tool_call>`` or ``<|im_end|>`` ends on a token boundary.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not "special": they survive decode(skip_special_tokens=True), as in Qwen3.
TAG_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<code>",
    "</code>",
    "<interpreter>",
    "</interpreter>",
]

# Qwen3-style layout (ChatML + hermes tool calls), one line with no whitespace control so
# every newline below is literal. HF renders with trim_blocks, which eats a newline
# right after a block tag, so those are written as {{ '\\n' }}. Assistant content is rendered verbatim;
# with enable_thinking=false every assistant turn opens with an empty think block, the
# same one the generation prompt inserts, so the rendering of a finished conversation
# equals the token stream an episode built turn by turn.
CHAT_TEMPLATE = (
    "{% set no_think = enable_thinking is defined and enable_thinking is false %}"
    "{% set think_open = '<think>\\n\\n</think>\\n\\n' if no_think else '' %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou can call these functions. Their signatures are inside <tools></tools>:\n"
    "<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\n\nTo call a function, write a JSON object with its name and arguments "
    "inside <tool_call></tool_call> tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}"
    "<|im_start|>user\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'system' and not loop.first %}"
    "<|im_start|>system\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n"
    "{% if message.reasoning_content %}"
    "<think>\n{{ message.reasoning_content }}\n</think>\n\n"
    "{% elif not (message.content or '').startswith('<think>') %}{{ think_open }}"
    "{% endif %}"
    "{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{% if not loop.first or message.content %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ fn.name }}", "arguments": '
    "{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ think_open }}{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE with digits split, the chat markers and tags, and the template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # every 1-3 digit group, a few times each, so each becomes one token
    groups = [str(i) for i in range(1000)] + [f"{i:02d}" for i in range(100)]
    groups += [f"{i:03d}" for i in range(100)]
    numbers = [" ".join(groups)] * 4
    tok.train_from_iterator([*numbers, *corpus], trainer=trainer)
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(str(out))
