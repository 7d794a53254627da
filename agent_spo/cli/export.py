"""`agent-spo export`: a Hugging Face model directory from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent_spo.cli.args import fail


def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run directory (its latest checkpoint), its checkpoints/, or "
            "one ckpt-* directory."
        ),  # fmt: skip
    ],
    out: Annotated[Path, typer.Option("--out", help="The model directory to write (new).")],
    dtype: Annotated[
        str,
        typer.Option(
            help="Weights' dtype: auto (the model config's), float32, bfloat16, float16."
        ),  # fmt: skip
    ] = "auto",
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="LoRA checkpoints: write the full model with the adapter merged "
            "in, instead of the adapter alone (peft format).",
        ),  # fmt: skip
    ] = False,
    base: Annotated[
        Path | None,
        typer.Option(
            help="LoRA checkpoints: the base model directory, if not the one the run "
            "recorded (a run trained on another machine)."
        ),  # fmt: skip
    ] = None,
) -> None:
    """Write a checkpoint as a model directory (safetensors, config, tokenizer, chat
    template) that transformers and vLLM load, whatever the number of learner ranks that
    wrote it. A LoRA run's checkpoint is written as its adapter (a peft directory, for
    PeftModel.from_pretrained or vLLM's --lora-modules), or with --merge as a full model."""
    from agent_spo.export import ExportError
    from agent_spo.export import export as run_export

    try:
        run_export(source, out, dtype=dtype, merge=merge, base=base, log=typer.echo)
    except ExportError as e:
        fail(str(e))
