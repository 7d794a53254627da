"""Token log-probs without the positions × vocabulary logits tensor.

A causal LM's logits for a batch are ``[B, n, V]``: with Qwen3's 151,936-token vocabulary
one 16k-token sequence is 10 GB in float32, most of it for prompt and padding positions
whose log-probs nobody reads. Here the model's body runs to its last hidden states, the
rows that score response tokens are picked out, and the LM head and log-softmax run over
them in chunks of ``chunk`` positions: ``log p(t) = h·w_t − logsumexp(h·W)``. With
gradients on, each chunk is checkpointed (its logits are recomputed in the backward
pass), so at most one chunk's ``[chunk, V]`` logits is alive at a time, forward or
backward, whatever the sequence length.

:func:`split_head` finds the body and the head of a transformers model;
:func:`head_matches` checks once, on a few tokens, that head(body(x)) is the model's own
logits (a model that scales or soft-caps its logits is not), so a caller can fall back
to the full logits for such a model.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def split_head(model) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(body, lm_head) of a transformers causal LM, or None when it has no such split."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor
) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [c, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    picked = logits.gather(-1, target[:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def chunked_logprobs(
    hidden: torch.Tensor, head: torch.nn.Linear, target: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """``log softmax(head(hidden))[i, target[i]]`` for hidden ``[N, H]``, target ``[N]``,
    computed ``chunk`` rows at a time (the log-softmax in float32 at least)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s : s + chunk], head.weight, head.bias, target[s : s + chunk])
        if grad:
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    if not out:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    return torch.cat(out)


@torch.no_grad()
def head_matches(model, vocab_size: int, tol: float = 1e-4) -> bool:
    """Whether log-probs through :func:`split_head` equal the model's own on a few tokens."""
    parts = split_head(model)
    if parts is None:
        return False
    body, head = parts
    device = next(model.parameters()).device
    ids = torch.arange(8, device=device)[None] % max(1, vocab_size)
    was_training = model.training
    model.eval()
    try:
        full = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)[0]
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0]
        target = ids[0].roll(-1)
        mine = chunked_logprobs(hidden, head, target, chunk=3)
    finally:
        model.train(was_training)
    ref = full.gather(-1, target[:, None]).squeeze(-1)
    return bool((mine - ref).abs().max() <= tol)


__all__ = ["chunked_logprobs", "head_matches", "split_head"]
