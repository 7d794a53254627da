"""FSDP2 for the learner: one shard group per decoder layer plus the root.

The root is the learner's scorer (the model plus its log-prob head), so the embedding,
the final norm and the LM head (tied or not) form one group, gathered once per pass.
Gradients are summed across ranks, not averaged: each rank's loss is already divided by
the global trainable-token count, so the sum is the single-process gradient.

On GPUs with bf16 the shards are float32 (the master weights and AdamW state); each
pass gathers a decoder layer in bf16 and reduces its gradients in float32. The root is
gathered in float32 (autocast still runs its matmuls in bf16), so the LM head's gradient,
which the log-prob chunks add up, is summed in float32 as in one process.
"""

from __future__ import annotations

import torch


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (``layers`` or ``h``)."""
    body = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        found = getattr(body, name, None)
        if isinstance(found, torch.nn.ModuleList) and len(found):
            return list(found)
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} to shard "
        "(looked for a ModuleList named layers, h or blocks under its base model)"
    )


def shard(root: torch.nn.Module, model, *, bf16: bool, cpu_offload: bool) -> None:
    """``fully_shard`` every decoder layer of ``model`` and then ``root`` (which holds
    ``model``), in place, over the default process group."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    groups = [fully_shard(layer, mp_policy=mp, offload_policy=offload) for layer in decoder_layers(model)]
    # the root (embedding, norm, LM head) keeps float32 weights in its passes: the head
    # runs once per log-prob chunk, and a bf16 copy would sum the chunks' gradients in
    # bf16 (autocast still runs its matmuls in bf16, each chunk's gradient reaching the
    # float32 weight on its own, as in one process)
    groups.append(fully_shard(root, mp_policy=MixedPrecisionPolicy(), offload_policy=offload))
    for group in groups:
        group.set_gradient_divide_factor(1.0)
        group.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def reshard(root: torch.nn.Module) -> None:
    """Put every sharded module of ``root`` back to its shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
