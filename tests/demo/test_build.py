"""The demo-model bootstrap, on a tiny budget: files, caching, tokenizer, demonstrations."""

from __future__ import annotations

import random

import pytest

from agent_spo.data.synthetic import make_tasks
from agent_spo.demo import build
from agent_spo.demo.demonstrations import (
    TOOL_SHARE,
    demonstration,
    expected_accuracy,
    family_and_level,
    solution_steps,
)

TINY = build.DemoModelSettings(
    sft_tasks=60, copy_steps=2, sft_steps=2, batch_size=4, hidden=32, layers=1, heads=2
)


def test_solution_steps_compute_every_answer():
    """The demonstrated code is right: running it gives the gold answer."""
    import contextlib
    import io

    for p in make_tasks(100, seed=3):
        steps = solution_steps(p)
        env: dict = {}
        for code, shown in steps:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, env)  # noqa: S102 - our own generated code
            assert out.getvalue().strip() == shown
        assert steps[-1][1] == p.answer


def test_demonstrations_mix_tool_use_and_guesses_by_family():
    rng = random.Random(0)
    tasks = make_tasks(2000, seed=5)
    used = {}
    for p in tasks:
        turns, tool = demonstration(p, "hermes", rng)
        fam, _ = family_and_level(p)
        used.setdefault(fam, []).append(tool)
        if not tool:  # a guess is one turn, and wrong
            assert len(turns) == 1 and f"\\boxed{{{p.answer}}}" not in turns[0][0]
    rates = {f: sum(v) / len(v) for f, v in used.items()}
    assert rates["two_step"] > rates["primes"] + 0.1  # per-prompt values differ
    for fam, r in rates.items():
        assert abs(r - (TOOL_SHARE[fam] - 0.075)) < 0.06  # mean level 1.5 -> -0.075
    assert 0.2 <= expected_accuracy(tasks) <= 0.6


def test_tokenizer_keeps_numbers_in_three_digit_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_SPO_CACHE", str(tmp_path))
    path = build.ensure_demo_model(TINY, log=lambda m: None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    pieces = [tok.decode([i]) for i in tok("366294924484 and 2^1263").input_ids]
    assert pieces[:4] == ["366", "294", "924", "484"] and "126" in pieces
    assert all(len(tok(str(n)).input_ids) == 1 for n in range(1000))
    for tag in ("<tool_call>", "</tool_call>", "<code>", "</code>", "<|im_end|>"):
        assert len(tok(tag, add_special_tokens=False).input_ids) == 1, tag


def test_ensure_builds_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_SPO_CACHE", str(tmp_path))
    logs: list[str] = []
    path = build.ensure_demo_model(TINY, log=logs.append)
    assert path == build.demo_model_dir(TINY) and path.parent == tmp_path
    for name in ("config.json", "model.safetensors", "tokenizer.json", "demo.json"):
        assert (path / name).exists(), name
    assert any("built in" in m for m in logs)
    logs.clear()
    assert build.ensure_demo_model(TINY, log=logs.append) == path and logs == []  # cached
    other = build.DemoModelSettings(**{**TINY.__dict__, "seed": 1})
    assert build.demo_model_dir(other) != path  # settings are part of the cache key

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings


def test_shared_prefix_loss_equals_the_plain_loss():
    """Running the common prompt prefix once per batch changes nothing but the cost."""
    import torch

    from agent_spo.demo.model import random_model
    from agent_spo.demo.tokenizer import train_tokenizer

    tasks = make_tasks(40, seed=9)
    tok = train_tokenizer([p.problem for p in tasks], vocab_size=400)
    r = build.renderer_for(tok, "hermes")
    rng = random.Random(1)
    data = [build._encode(r, p, demonstration(p, "hermes", rng)[0]) for p in tasks[:8]]
    prefix = build._common_prefix([x for x, _ in data])
    assert len(prefix) > 50  # the system prompt and tool schema
    model = random_model(tok, hidden=32, layers=2, heads=2).train()
    shared = build._shared_prefix_loss(model, prefix, data, tok.pad_token_id)
    n = max(len(x) for x, _ in data)
    ids = torch.zeros((len(data), n), dtype=torch.long)
    lab = torch.full((len(data), n), -100)
    att = torch.zeros((len(data), n), dtype=torch.long)
    for i, (x, m) in enumerate(data):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        lab[i, : len(x)] = torch.tensor([t if k else -100 for t, k in zip(x, m, strict=True)])
    logits = model(input_ids=ids, attention_mask=att).logits
    plain = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1)
    )
    assert shared.item() == pytest.approx(plain.item(), abs=1e-5)
    w = model.model.layers[0].self_attn.q_proj.weight
    g1 = torch.autograd.grad(shared, w)[0]
    g2 = torch.autograd.grad(plain, w)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


class _Oracle:
    """Predicts each next token from the sequence it is given (right every time), or
    one token off (wrong every time)."""

    def __init__(self, vocab: int, wrong: bool = False) -> None:
        self.vocab, self.wrong = vocab, wrong

    def __call__(self, input_ids):
        import torch

        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt = (nxt + 1) % self.vocab
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})


def test_copy_probe_scores_perfect_and_hopeless_copiers():
    from agent_spo.demo.model import random_model
    from agent_spo.demo.probe import copy_probe
    from agent_spo.demo.tokenizer import train_tokenizer

    tasks = make_tasks(25, seed=4)
    tok = train_tokenizer([p.problem for p in tasks], vocab_size=400)
    r = build.renderer_for(tok, "hermes")
    right = copy_probe(_Oracle(len(tok)), r, tasks)
    assert right.tasks == 25 and right.code == 1.0 and right.answer == 1.0
    wrong = copy_probe(_Oracle(len(tok), wrong=True), r, tasks)
    assert wrong.code == 0.0 and wrong.answer == 0.0
    assert sum(v[2] for v in wrong.by_kind.values()) == 25
    assert set(wrong.to_dict()["by_kind"]) == {p.source.split(":", 1)[1] for p in tasks}
    rand = copy_probe(random_model(tok, hidden=32, layers=1, heads=2), r, tasks)
    assert rand.answer < 0.5  # an untrained model does not copy
