"""The demo policy's architecture: a tiny Qwen3 (same code path as Qwen3-8B, ~1M params)."""

from __future__ import annotations

from pathlib import Path


def tiny_qwen3_config(
    vocab_size: int,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    max_positions: int = 2048,
    pad_token_id: int = 0,
    eos_token_id: int = 2,
):
    """A Qwen3Config sized for 2 CPU cores; tied embeddings, as small Qwen3 models have."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )  # fmt: skip


def random_model(tokenizer, seed: int = 0, **sizes):
    """A randomly initialised tiny Qwen3 for `tokenizer` (tests and SFT start here)."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = tiny_qwen3_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
    )
    return Qwen3ForCausalLM(config).eval()


def save_model_dir(model, tokenizer, out: Path) -> Path:
    """Save as a normal Hugging Face model directory (config, safetensors, tokenizer)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
