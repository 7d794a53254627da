"""A tiny random Qwen3 model directory with the project's tokenizer, built once per session."""

from __future__ import annotations

import random

import pytest


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100, 10**5), rng.randrange(100, 10**5)
        out.append(f"What is {a} multiplied by {b}? The answer is \\boxed{{{a * b}}}.")
        out.append(f"<code>\n```python\nprint({a} * {b})\n```\n</code>")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer

    tok = train_tokenizer(_corpus(), vocab_size=400)
    out = tmp_path_factory.mktemp("tiny_qwen3")
    save_model_dir(random_model(tok, seed=0, hidden=64, layers=2, heads=4), tok, out)
    return out
