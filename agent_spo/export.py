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
from typing import Any

from agent_spo import lora
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
    source: Path,
    out: Path,
    *,
    dtype: str = "auto",
    merge: bool = False,
    base: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the checkpoint ``source`` names as a model directory ``out``; returns it. A
    LoRA checkpoint is written as a peft adapter directory, or with ``merge`` as the full
    model with the adapter merged in; ``base`` replaces the base model path the adapter
    records (a run trained elsewhere)."""
    import torch

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = find_checkpoint(source)
    adapter_dir = ckpt.path / "adapter"
    adapted = (adapter_dir / lora.ADAPTER_CONFIG).is_file()
    if merge and not adapted:
        raise ExportError(
            f"--merge: {ckpt.path} holds no LoRA adapter (full fine-tuning: export it "
            "without --merge)"
        )
    if base is not None and not adapted:
        raise ExportError(f"--base: {ckpt.path} holds no LoRA adapter, so it has no base model")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: choose a new --out")
    _quiet_loading()
    if adapted and not merge:  # the adapter alone: read from the shards, no base model
        from transformers import AutoConfig

        config = lora.load_config(adapter_dir)
        base_path = (
            str(Path(base).resolve()) if base is not None else config.base_model_name_or_path
        )
        target = _target_dtype(AutoConfig.from_pretrained(str(ckpt.model_dir)), dtype)
        named = [(lora.adapter_name(n), t if target is None else t.to(target))
                 for n, t in _adapter_state(ckpt)]  # fmt: skip

        def write(tmp: Path) -> None:
            lora.save_adapter(tmp, named, config, base_path)

        what = f"LoRA adapter (rank {config.r}, {named[0][1].dtype})"
        return _write(ckpt, out, write, what, log)
    if adapted:
        model = _merged(_adapted_model(ckpt, adapter_dir, base))
        target = _target_dtype(model.config, dtype)
    else:
        model = _full_model(ckpt)
        target = _target_dtype(model.config, dtype)
    if target is not None and target != torch.float32:
        model = model.to(target)
    merged = " with the adapter merged" if adapted else ""
    return _write(
        ckpt, out, lambda tmp: model.save_pretrained(str(tmp)), f"{model.dtype}{merged}", log
    )


def _quiet_loading() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _target_dtype(config, dtype: str):
    """The dtype to write: the one asked for, else the model config's (None: as is)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    target = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, target) if isinstance(target, str) else target


def _read_state(ckpt: Checkpoint, model, keep=lambda name: True) -> None:
    """Load the checkpoint's shards (any world size) into ``model``: every weight
    ``keep`` names must be there."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if keep(k)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt.path / "state"), no_dist=True)
    strict = len(state["model"]) == len(get_model_state_dict(model))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=strict))


def _adapter_state(ckpt: Checkpoint) -> list[tuple[str, Any]]:
    """The adapter's weights in a LoRA checkpoint's shards (model parameter names), read
    at the shapes and dtypes the shards record."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not ckpt.sharded:
        raise ExportError(f"{ckpt.path} holds no adapter weights (no state/)")
    saved = dcp.FileSystemReader(str(ckpt.path / "state")).read_metadata().state_dict_metadata
    state = {
        k.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in saved.items()
        if k.startswith("model.") and lora.is_adapter(k) and isinstance(m, TensorStorageMetadata)
    }
    if not state:
        raise ExportError(f"{ckpt.path}: the shards hold no adapter weights")
    wrapped = {"model": state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(wrapped, checkpoint_id=str(ckpt.path / "state"), no_dist=True)
    return sorted(wrapped["model"].items())


def _full_model(ckpt: Checkpoint):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt.model_dir))
    dtype = config.dtype  # the model's own: from_config sets the float32 it builds in
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.dtype = dtype
    if ckpt.sharded:
        _read_state(ckpt, model)  # strict: every weight must be there
        return model
    if ckpt.has_weights:  # written before sharded checkpoints
        model = AutoModelForCausalLM.from_pretrained(str(ckpt.model_dir), dtype=torch.float32)
        model.config.dtype = dtype
        return model
    raise ExportError(f"{ckpt.path} holds no weights (neither state/ nor model/ weights)")


def _adapted_model(ckpt: Checkpoint, adapter_dir: Path, base: str | Path | None):
    """The base model with the checkpoint's adapter, in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = lora.load_config(adapter_dir)
    path = str(base) if base is not None else config.base_model_name_or_path
    if not path or not Path(path).is_dir():
        raise ExportError(
            f"the adapter in {ckpt.path} was trained on the base model {path!r}, which is "
            "not a directory here: name it with --base PATH"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.dtype = AutoConfig.from_pretrained(path).dtype  # what export writes
    lora.inject(model, config)
    if not ckpt.sharded:
        raise ExportError(f"{ckpt.path} holds no adapter weights (no state/)")
    _read_state(ckpt, model, keep=lora.is_adapter)
    return model


def _merged(model):
    """A plain model of the same config holding ``model``'s merged weights."""
    import torch
    from transformers import AutoModelForCausalLM

    named = [*model.named_parameters(),
             *((n, b) for n, b in model.named_buffers() if n in model.state_dict())]  # fmt: skip
    weights = dict(lora.merged_weights(((n, t.detach()) for n, t in named), lora.scalings(model)))
    dtype = model.config.dtype
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.config.dtype = dtype
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(plain.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ExportError(f"merging the adapter: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain


def _write(ckpt: Checkpoint, out: Path, save: Callable[[Path], None], what: str, log) -> Path:
    """``save`` into a temporary directory beside ``out``, add the checkpoint's tokenizer,
    generation config and chat template, then rename it into place."""
    from transformers import AutoTokenizer

    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
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
    log(f"exported {ckpt.path.name} (step {ckpt.step}) -> {out} ({what})")
    return out


__all__ = ["DTYPES", "ExportError", "export", "find_checkpoint"]
