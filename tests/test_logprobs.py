"""Chunked log-probs: equal to the model's full logits, gradients included, and the
largest vocabulary-sized tensor grows with the chunk, never with the positions."""

from __future__ import annotations

import copy

import pytest
import torch
from test_learner import _model, _trajectories, tok  # noqa: F401 - tok is a fixture
from torch.utils._python_dispatch import TorchDispatchMode

from agent_spo.learner import Learner
from agent_spo.logprobs import chunked_logprobs, head_matches, split_head


def test_chunks_equal_one_full_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).double()
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)  # a weighted sum: unequal gradients
    full = torch.log_softmax(head(hidden), -1).gather(-1, target[:, None]).squeeze(-1)
    g_full = torch.autograd.grad((full * weights).sum(), (hidden, head.weight, head.bias))
    for chunk in (1, 5, 37, 100):
        mine = chunked_logprobs(hidden, head, target, chunk)
        assert torch.allclose(mine, full, atol=1e-12)
        g = torch.autograd.grad((mine * weights).sum(), (hidden, head.weight, head.bias))
        for a, b in zip(g, g_full, strict=True):
            assert torch.allclose(a, b, atol=1e-12)


def test_chunked_entropy_equals_the_full_softmax_entropy_gradients_included():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=True).double()
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (23,))
    w_lp, w_h = torch.randn(23, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    p = torch.softmax(head(hidden), -1)
    full_h = -(p * p.log()).sum(-1)
    full_lp = p.log().gather(-1, target[:, None]).squeeze(-1)
    objective = (full_lp * w_lp).sum() + (full_h * w_h).sum()
    g_full = torch.autograd.grad(objective, (hidden, head.weight, head.bias))
    assert full_h.min() > 0 and full_h.max() < torch.log(torch.tensor(50.0))
    for chunk in (1, 4, 23, 64):
        lp, h = chunked_logprobs(hidden, head, target, chunk, entropy=True)
        assert torch.allclose(lp, full_lp, atol=1e-12) and torch.allclose(h, full_h, atol=1e-12)
        g = torch.autograd.grad((lp * w_lp).sum() + (h * w_h).sum(),
                                (hidden, head.weight, head.bias))  # fmt: skip
        for a, b in zip(g, g_full, strict=True):
            assert torch.allclose(a, b, atol=1e-12)


def test_bf16_head_gradient_does_not_degrade_with_the_number_of_chunks():
    # under autocast the head's gradient must reach the float32 weight chunk by chunk,
    # not summed in one cached bf16 copy (whose rounding grows with the chunk count)
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 512, bias=False)
    hidden = torch.randn(448, 64)
    target = torch.randint(0, 512, (448,))
    ref_head = copy.deepcopy(head).double()
    ref = chunked_logprobs(hidden.double(), ref_head, target, 448).sum()
    (g_ref,) = torch.autograd.grad(ref, ref_head.weight)

    def rel_error(chunk: int) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = chunked_logprobs(hidden, head, target, chunk).sum()
        (g,) = torch.autograd.grad(lp, head.weight)
        return float((g.double() - g_ref).norm() / g_ref.norm())

    one, many = rel_error(448), rel_error(1)
    assert many < 1.5 * one + 1e-3, (one, many)


def test_lean_and_full_learners_give_equal_log_probs_and_updates(tok):  # noqa: F811
    base = _model(tok, torch.float64)
    lean = Learner(copy.deepcopy(base), lr=1e-2, logprob_chunk=7, mini_batches=2)
    full = Learner(copy.deepcopy(base), lr=1e-2, logprob_chunk=None, mini_batches=2)
    assert lean.lean and not full.lean
    trajs = _trajectories(full, 6, len(tok), seed=3)
    for a, b in zip(lean.token_logprobs(trajs), full.token_logprobs(trajs), strict=True):
        assert (a - b).abs().max() < 1e-10
    adv = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0]
    sa, sb = lean.step(trajs, adv), full.step(trajs, adv)
    assert abs(sa.loss - sb.loss) < 1e-10 and abs(sa.drift - sb.drift) < 1e-10
    for (n, pa), (_, pb) in zip(lean.model.named_parameters(), full.model.named_parameters(),
                                strict=True):  # fmt: skip
        assert torch.allclose(pa, pb, atol=1e-10), n


class _VocabTensors(TorchDispatchMode):
    """Records the largest tensor of logits shape: [..., positions, vocabulary] (the LM
    head's weight and its gradient, [hidden, vocabulary] transposed, are left out)."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.hidden, self.largest = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if (
                isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                and t.shape[-2] != self.hidden
            ):  # fmt: skip
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [4, 16])
def test_peak_vocab_tensor_follows_the_chunk_not_the_positions(tok, chunk):  # noqa: F811
    model = _model(tok)
    vocab = model.config.vocab_size
    lean = Learner(copy.deepcopy(model), logprob_chunk=chunk)
    full = Learner(copy.deepcopy(model), logprob_chunk=None)
    trajs = _trajectories(full, 12, len(tok), seed=5)
    positions = sum(len(t.response_token_ids) for t in trajs)
    assert positions > 4 * chunk
    seen = {}
    for name, learner in (("lean", lean), ("full", full)):
        learner.model.zero_grad()
        with _VocabTensors(vocab, model.config.hidden_size) as probe:
            logp, mask, _ = learner._forward(trajs)
            (logp * mask).sum().backward()  # the backward recomputes chunk by chunk
        seen[name] = probe.largest
    assert seen["lean"] == chunk * vocab  # one chunk's logits at a time
    assert seen["full"] >= positions * vocab  # every position's logits at once


def test_a_model_whose_logits_are_not_head_of_body_falls_back(tok):  # noqa: F811
    model = _model(tok)
    assert head_matches(model) and split_head(model) is not None

    class Scaled(torch.nn.Module):  # logits x 2, as some models scale theirs
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config
            self.base_model = inner.base_model

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = out.logits * 2
            return out

    assert not head_matches(Scaled(model))
