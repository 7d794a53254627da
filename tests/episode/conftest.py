"""A demo-style tokenizer (the project's BPE + Qwen3-style template), built once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def chat_tokenizer():
    from agent_spo.data.synthetic import make_tasks
    from agent_spo.demo.demonstrations import call_text, solution_steps
    from agent_spo.demo.tokenizer import train_tokenizer

    corpus = []
    for p in make_tasks(300, seed=7):
        corpus.append(p.problem)
        corpus.extend(call_text(f, code) + "\n" + out for f in ("hermes", "retool")
                      for code, out in solution_steps(p))  # fmt: skip
    return train_tokenizer(corpus, vocab_size=500)
