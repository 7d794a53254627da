"""Low-rank adapters (LoRA) through peft: the learner trains them, engines receive them.

With ``learner.lora.rank`` > 0 the learner's model gets peft's LoRA layers injected in
place (:func:`inject`): every targeted linear layer keeps its frozen base weight and gains
two small trainable matrices A (rank x in) and B (out x rank), B starting at zero, so the
model starts as the base model. Only A and B are trained and held by the optimizer.

Weights leave the learner in one of two forms:

* **adapter** (:func:`adapter_name`): only A and B, under the names peft saves them with
  (``base_model.model.<module>.lora_A.weight``), the form ``adapter_model.safetensors``
  holds. An engine whose model has the same adapter layers (:func:`loads_adapters`)
  copies them in; an engine that loads adapter files (vLLM) reads them from disk;
* **merged** (:func:`merged_weights`): the full model with each adapted layer's weight
  replaced by ``W + scaling * B @ A`` under the base model's own names, for engines that
  load plain weights. It is what peft's ``merge_and_unload`` gives, computed one layer at
  a time.

A checkpoint holds the adapter and its optimizer state; ``agent-spo export`` writes the
adapter as a peft directory (:func:`save_adapter`) or, with ``--merge``, a full model.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ADAPTER = "default"  # peft's adapter name inside the model
PEFT_PREFIX = "base_model.model."  # what peft's saved names start with
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PARTS = (".lora_A.", ".lora_B.")
NO_ADAPTERS = "the engine cannot hold adapters"  # why a LoRA run's syncs send merged weights


def peft_config(settings: dict[str, Any] | Any):
    """peft's LoraConfig for the ``learner.lora`` section (an object or a plain dict)."""
    from peft import LoraConfig

    s = settings if isinstance(settings, dict) else settings.model_dump(mode="json")
    target = s["target_modules"]
    return LoraConfig(
        r=int(s["rank"]),
        lora_alpha=int(s["alpha"] if s.get("alpha") is not None else 2 * s["rank"]),
        lora_dropout=float(s["dropout"]),
        target_modules=target if isinstance(target, str) else list(target),
        bias="none",
        task_type="CAUSAL_LM",
    )


def inject(model: torch.nn.Module, settings) -> torch.nn.Module:
    """Add LoRA layers to ``model`` in place (base weights frozen, adapters trainable, at
    least float32); returns it. ``settings``: the learner.lora section, or a peft
    LoraConfig. Refuses targets that are not linear layers of the decoder blocks (see
    the errors below)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    config = settings if isinstance(settings, LoraConfig) else peft_config(settings)
    try:  # peft expands "all-linear" in the config it is given: it gets a copy
        with warnings.catch_warnings():  # what they warn of is refused below, by key
            warnings.filterwarnings("ignore", "Model has `tie_word_embeddings=True`")
            warnings.filterwarnings("ignore", "fan_in_fan_out is set to False")
            inject_adapter_in_model(copy.deepcopy(config), model, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"learner.lora.target_modules: {e}") from e
    for name, p in model.named_parameters():  # peft makes them in the base's dtype
        if is_adapter(name) and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    other = sorted({type(m).__name__ for _, m in adapted if not isinstance(m, LoraLinear)})
    if other:
        raise ValueError(
            f"learner.lora.target_modules: only linear layers can be adapted here, the "
            f"targets include {', '.join(other)} layers"
        )
    # a Conv1D-style layer (GPT-2) stores its weight transposed; merging here assumes not
    transposed = [n for n, m in adapted if getattr(m, "fan_in_fan_out", False)]
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    tied = [n for n, m in adapted
            if getattr(embedding, "weight", None) is m.base_layer.weight]  # fmt: skip
    head = [n for n, _ in adapted if n.split(".")[-1] == "lm_head"]
    if transposed or tied or head:
        raise ValueError(
            "learner.lora.target_modules: adapt the linear layers of the decoder blocks; "
            f"not the LM head or a weight tied to the embedding ({', '.join(head + tied)}) "
            f"nor a transposed Conv1D layer ({', '.join(transposed)})"
        )
    model._agent_spo_lora = config  # type: ignore[assignment]  # save_adapter writes it
    return model


def is_adapter(name: str) -> bool:
    """Whether ``name`` is an adapter weight (a model parameter or a peft-format name)."""
    return any(p in name for p in _PARTS)


def adapter_name(name: str) -> str:
    """The peft-format name of the model parameter ``name``:
    ``m.layers.0.q_proj.lora_A.default.weight`` -> ``base_model.model.m.layers.0.q_proj.lora_A.weight``."""
    for part in _PARTS:
        name = name.replace(f"{part}{ADAPTER}.", part)
    return PEFT_PREFIX + name


def model_name(name: str) -> str:
    """The inverse of :func:`adapter_name`: the parameter name in a model with the adapter."""
    name = name.removeprefix(PEFT_PREFIX)
    for part in _PARTS:
        name = name.replace(part, f"{part}{ADAPTER}.")
    return name


def loads_adapters(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds LoRA layers (an engine that can take adapter-only updates)."""
    return getattr(model, "_agent_spo_lora", None) is not None


def shape_of(config) -> dict[str, Any]:
    """What an adapter's layers depend on, comparable as a dict: ``{"rank", "alpha",
    "targets"}`` of a peft LoraConfig (or the learner.lora section). A replica reports it
    so the trainer sends adapters only to replicas that hold the same layers."""
    from peft import LoraConfig

    c = config if isinstance(config, LoraConfig) else peft_config(config)
    t = c.target_modules
    return {"rank": int(c.r), "alpha": int(c.lora_alpha),
            "targets": t if isinstance(t, str) else sorted(t or [])}  # fmt: skip


def cli_args(settings) -> list[str]:
    """The ``agent-spo engine serve`` options that make a replica hold these adapters."""
    shape = shape_of(settings)
    targets = shape["targets"]
    return ["--lora-rank", str(shape["rank"]), "--lora-alpha", str(shape["alpha"]),
            "--lora-targets", targets if isinstance(targets, str) else ",".join(targets)]  # fmt: skip


def scalings(model: torch.nn.Module) -> dict[str, float]:
    """Each adapted layer's name and its scaling alpha / rank."""
    from peft.tuners.lora import LoraLayer

    return {n: float(m.scaling[ADAPTER]) for n, m in model.named_modules()
            if isinstance(m, LoraLayer)}  # fmt: skip


def merged_weights(
    named: Iterable[tuple[str, torch.Tensor]], scaling: dict[str, float]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's weights from a LoRA model's ``named`` (full) tensors, in order:
    ``X.base_layer.weight`` comes out as ``X.weight = W + scaling * B @ A`` once both of
    X's adapter matrices have passed, ``X.base_layer.bias`` as ``X.bias``, the adapter
    matrices themselves not at all. ``scaling`` is :func:`scalings` of the model."""
    held: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named:
        if ".base_layer." in name:
            layer, _, rest = name.partition(".base_layer.")
            if rest != "weight":
                yield f"{layer}.{rest}", t
                continue
            held.setdefault(layer, {})["W"] = t
        elif is_adapter(name):
            part = "A" if ".lora_A." in name else "B"
            layer = name.split(f".lora_{part}.")[0]
            held.setdefault(layer, {})[part] = t
        else:
            yield name, t
            continue
        got = held[layer]
        if len(got) == 3:
            del held[layer]
            w, a, b = got["W"], got["A"], got["B"]
            delta = (b.double() @ a.double()) * scaling[layer]
            yield f"{layer}.weight", (w.double() + delta).to(w.dtype)
    if held:
        raise ValueError(f"adapted layers without all of W, A, B: {sorted(held)}")


def base_model_of(model: torch.nn.Module) -> str | None:
    """The path (made absolute) or hub name the model was loaded from, if known."""
    import os

    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not name:
        return None
    return os.path.abspath(name) if os.path.isdir(name) else name


def save_adapter(
    out: str | Path,
    weights: Iterable[tuple[str, torch.Tensor]] | None,
    config,
    base_model: str | None,
) -> Path:
    """Write a peft adapter directory: ``adapter_config.json`` (``config``, naming
    ``base_model``) and ``adapter_model.safetensors`` (``weights`` in peft-format names;
    None: the config alone)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        tensors = {n: t.detach().cpu().contiguous() for n, t in weights}
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.copy(config)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))
    return out


def load_config(path: str | Path):
    """peft's LoraConfig from an adapter directory."""
    from peft import LoraConfig

    return LoraConfig.from_pretrained(str(path))


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())


def sends_adapter(learner, engine) -> bool:
    """Whether a weight sync sends the adapter alone: the learner trains one and the
    engine holds the same adapter layers."""
    return bool(getattr(learner, "lora", False) and getattr(engine, "loads_adapters", False))


def policy_weights(learner, engine) -> Iterator[tuple[str, torch.Tensor]]:
    """What a weight sync sends: the adapter alone (:func:`sends_adapter`), else the full
    weights (with LoRA: merged)."""
    if sends_adapter(learner, engine):
        return learner.named_weights(adapter_only=True)
    return learner.named_weights()


def describe(summary: dict[str, Any], *, adapter_sync: bool, why_merged: str = NO_ADAPTERS) -> str:
    """One line on what trains, from ``Learner.summary()``; ``why_merged`` says why a
    LoRA run's syncs send merged weights."""
    trainable, total = summary["trainable_params"], summary["total_params"]
    state = f"AdamW state {summary['optimizer_bytes'] / 2**20:,.1f} MiB"
    if "lora" not in summary:
        return f"learner: full fine-tuning, {total:,} parameters; {state}"
    lo = summary["lora"]
    sync = "the adapter alone" if adapter_sync else f"merged weights ({why_merged})"
    return (
        f"learner: LoRA rank {lo['rank']} (alpha {lo['alpha']:g}) on {lo['layers']} linear "
        f"layers, {trainable:,} of {total:,} parameters trainable "
        f"({trainable / total:.1%}); {state}; each sync sends {sync}"
    )


def trainable_summary(params: Iterable[torch.nn.Parameter]) -> tuple[int, int]:
    """(trainable parameters, all parameters) over full (unsharded) sizes."""
    trainable = total = 0
    for p in params:
        n = p.numel()  # a DTensor's numel is the full tensor's
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
