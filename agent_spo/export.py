"""``agent-spo export``: a Hugging Face model directory from any checkpoint.

A checkpoint holds the weights in ``state/`` (torch.distributed.checkpoint shards, one
per learner rank) and the config, tokenizer and chat template in ``model/``. Export
builds the model from that config, reads the weights out of the shards in one process
(whatever the world size that wrote them), and writes safetensors, config, generation
config, tokenizer and chat template: a directory transformers and vLLM load as they are.
The weights are written in the dtype the model's config names (bf16 for Qwen3; the
learner's float32 master weights are rounded once, here), or the one ``dtype`` asks for.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from agent_spo.checkpoint import Checkpoint, latest_checkpoint

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ExportError(ValueError):
    """The source is not a checkpoint, or the destination is taken."""


def find_checkpoint(source: Path) -> Checkpoint:
    """A ``ckpt-*`` directory, a run's ``checkpoints/`` directory, or a run directory
    (its latest checkpoint)."""
    source = Path(source)
    if (source / "state.json").is_file():  # one ckpt-* directory
        state = json.loads((source / "state.json").read_text())
        return Checkpoint(source, int(state["step"]), state)
    for root in (source, source / "checkpoints"):
        if root.is_dir() and (found := latest_checkpoint(root)) is not None:
            return found
    raise ExportError(
        f"{source}: no checkpoint (expected a ckpt-* directory, a run's checkpoints/ "
        "directory, or a run directory)"
    )


def export(
    source: Path, out: Path, *, dtype: str = "auto", log: Callable[[str], None] = print
) -> Path:
    """Write the checkpoint ``source`` names as a model directory ``out``; returns it."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = find_checkpoint(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: choose a new --out")
    config = AutoConfig.from_pretrained(str(ckpt.model_dir))
    target = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # sets config.dtype
    if ckpt.sharded:
        state = {"model": get_model_state_dict(model)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(ckpt.path / "state"), no_dist=True)
        set_model_state_dict(model, state["model"])  # strict: every weight must be there
    elif ckpt.has_weights:  # written before sharded checkpoints
        model = AutoModelForCausalLM.from_pretrained(str(ckpt.model_dir), dtype=torch.float32)
    else:
        raise ExportError(f"{ckpt.path} holds no weights (neither state/ nor model/ weights)")
    if dtype != "auto":
        target = getattr(torch, dtype)
    elif isinstance(target, str):
        target = getattr(torch, target)
    if isinstance(target, torch.dtype) and target != torch.float32:
        model = model.to(target)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if (ckpt.model_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(ckpt.model_dir)).save_pretrained(str(tmp))
    else:
        log(f"warning: {ckpt.model_dir} has no tokenizer; the export has none either")
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (ckpt.model_dir / extra).is_file():  # the checkpoint's, not one rebuilt
            shutil.copy2(ckpt.model_dir / extra, tmp / extra)
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    log(f"exported {ckpt.path.name} (step {ckpt.step}) -> {out} ({model.dtype})")
    return out


__all__ = ["DTYPES", "ExportError", "export", "find_checkpoint"]
