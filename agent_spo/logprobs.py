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
:func:`head_matches` checks once, on a few tokens, that the model's logits are its head's
output on its body's output (a model that scales or soft-caps its logits fails), so a
caller can fall back to the full logits for such a model.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def split_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(body, lm_head) of a transformers causal LM, or None when it has no such split."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor):
    logits = head(hidden)  # [c, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    picked = logits.gather(-1, target[:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs_entropy(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor):
    """Log-probs and each row's entropy over the vocabulary, ``[2, c]``."""
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)  # [c, V]
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.stack([logp.gather(-1, target[:, None]).squeeze(-1), entropy])


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension (float32 at least)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return -(logp.exp() * logp).sum(-1)


def chunked_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    target: torch.Tensor,
    chunk: int = 1024,
    *,
    entropy: bool = False,
) -> torch.Tensor:
    """``log softmax(head(hidden))[i, target[i]]`` for hidden ``[N, H]``, target ``[N]``,
    computed ``chunk`` rows at a time (the log-softmax in float32 at least). With
    ``entropy`` the result is ``[2, N]``: the log-probs, then each row's entropy over the
    vocabulary (for an entropy bonus; its gradient flows too).

    Under autocast the cast of the head's weight is not cached across chunks: with the
    cache, every chunk's gradient would be summed into one bf16 copy of the weight
    before reaching the float32 master (error growing with the number of chunks);
    without it each chunk's gradient reaches the master on its own."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    kind = hidden.device.type
    autocast = torch.is_autocast_enabled(kind)
    dtype = torch.get_autocast_dtype(kind) if autocast else None
    out = []
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    fn = _chunk_logprobs_entropy if entropy else _chunk_logprobs
    with torch.autocast(kind, dtype=dtype, enabled=autocast, cache_enabled=False):
        for s in range(0, hidden.shape[0], chunk):
            args = (head, hidden[s : s + chunk], target[s : s + chunk])
            if grad:  # the chunk's logits are recomputed in the backward pass
                out.append(checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False))
            else:
                out.append(fn(*args))
    if not out:
        shape = (2, 0) if entropy else (0,)
        return hidden.new_zeros(shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
    return torch.cat(out, dim=-1)


@torch.no_grad()
def head_matches(model) -> bool:
    """Whether the model's logits are exactly its head applied to its body's output, on a
    few tokens (False for a model that scales or caps its logits, for a body whose output
    is not the head's input, and for anything that fails to run)."""
    parts = split_head(model)
    if parts is None:
        return False
    body, head = parts
    seen: dict = {}

    def hook(module, args, output) -> None:
        seen["input"], seen["output"] = args[0], output

    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 8
    was_training = model.training
    handle = head.register_forward_hook(hook)
    try:
        model.eval()
        ids = torch.arange(8, device=next(model.parameters()).device)[None] % vocab
        logits = model(input_ids=ids, use_cache=False).logits
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state
        return (
            "output" in seen
            and torch.equal(logits, seen["output"])
            and hidden.shape == seen["input"].shape
            and torch.allclose(hidden, seen["input"], rtol=1e-4, atol=1e-5)
        )
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError):
        return False  # a body or head this call cannot drive: keep the full logits
    finally:
        handle.remove()
        model.train(was_training)


__all__ = ["chunked_logprobs", "head_matches", "split_head", "token_entropy"]
