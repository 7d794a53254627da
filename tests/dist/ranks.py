"""Learner factories the rank processes of the tests import (``tests.dist.ranks:NAME``)."""

from __future__ import annotations


def tiny_learner(
    *, rank: int, world_size: int, seed: int = 0, dtype: str = "float32", lora_rank: int = 0,
    **kw,
):
    """A 2-layer demo-architecture learner; ``lora_rank`` > 0 trains adapters of that rank."""
    import torch

    from agent_spo.demo.tokenizer import train_tokenizer
    from agent_spo.learner import Learner

    from agent_spo.demo.model import random_model

    tok = train_tokenizer(
        [f"What is {i} times {i + 7}? {i * (i + 7)}" for i in range(300)], vocab_size=400
    )
    model = random_model(tok, seed=seed, hidden=32, layers=2, heads=2).to(getattr(torch, dtype))
    if lora_rank:
        from agent_spo import lora
        from agent_spo.config import LoraConfig

        lora.inject(model, LoraConfig(rank=lora_rank))
    return Learner(model, rank=rank, world_size=world_size, **kw)


def broken_learner(*, rank: int, world_size: int):
    """A factory that fails on the ranks other than 0 (a rank that cannot start)."""
    if rank > 0:
        raise SystemExit(3)
    return tiny_learner(rank=rank, world_size=world_size)


def slow_learner(*, rank: int, world_size: int, build_s: float = 3.0):
    """A factory that takes ``build_s`` seconds on the ranks other than 0 (a large model
    loading), longer than the test's command timeout."""
    import time

    if rank > 0:
        time.sleep(build_s)
    return tiny_learner(rank=rank, world_size=world_size)
