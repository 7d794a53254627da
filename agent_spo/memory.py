"""The learner's memory plan: bytes per GPU before a run starts (``train --dry-run``).

Counts, per learner rank, for the config's model, world size, precision and micro-batch:

* **weights, gradients, AdamW state**: float32 master weights (4 B/param), float32
  gradients (4 B) and two float32 moments (8 B), each sharded over ``world_size`` ranks
  (FSDP2); with ``cpu_offload`` they live in CPU memory instead;
* **gathered weights**: what FSDP unshards for a pass: the root (embedding, final norm,
  LM head) in float32 for the whole pass, and two decoder layers in the compute dtype
  (the one running and the one prefetched); one unsharded process under bf16 autocast keeps a
  bf16 copy of every weight instead;
* **activations**: with gradient checkpointing, every layer's input (hidden × tokens)
  plus one layer's full set while it is recomputed; without it, every layer's full set
  (per token: 4·hidden + 2·q + 2·kv + 4·intermediate values, the tensors a Qwen3/Llama block
  keeps for its backward; attention by a fused kernel, no tokens² term);
* **packing mask**: with ``learner.pack: on`` and attention other than flash attention,
  a (tokens per micro-batch)² boolean mask per pass;
* **log-prob chunk**: ``logprob_chunk`` × vocabulary float32 logits, three live at once
  (logits, their softmax, its gradient);
* **LoRA** (``learner.lora``): the frozen base weights (bf16 in one unsharded process under
  bf16, where they need no float32 masters; float32 shards otherwise) and the adapters'
  float32 weights, gradients and AdamW moments; activations as without it;
* **reserve**: 2 GiB for the CUDA context, the allocator's fragmentation and NCCL buffers.

A micro-batch's tokens are ``max(micro_batch_tokens, longest row)``: a row never splits,
and the longest row is ``rollout.max_model_len`` or, unset, the response budget plus
4,096 tokens of prompt and tool output. It is an estimate for choosing a layout: the
device check measures the real peak on one GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
RESERVE = 2 * GIB
PROMPT_ALLOWANCE = 4096


class MemoryPlanError(ValueError):
    """The model's config cannot be read, or the plan does not fit."""


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a decoder-only transformer's config."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    q: int  # query width: heads x head dim (not always hidden)
    kv: int  # key/value width: kv heads x head dim
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        text = cfg.get("text_config", cfg)
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            head_dim = int(text.get("head_dim") or hidden // heads)
            return cls(
                layers=int(text["num_hidden_layers"]),
                hidden=hidden,
                intermediate=int(text["intermediate_size"]),
                vocab=int(text["vocab_size"]),
                q=heads * head_dim,
                kv=int(text.get("num_key_value_heads") or heads) * head_dim,
                head_dim=head_dim,
                tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MemoryPlanError(f"the model config lacks a decoder shape field: {e}") from e

    @property
    def layer_params(self) -> int:
        h = self.hidden
        attention = h * self.q * 2 + h * self.kv * 2  # q and o; k and v (no biases)
        norms = 2 * h + 2 * self.head_dim  # two block norms; Qwen3's q/k norms
        return attention + 3 * h * self.intermediate + norms

    @property
    def root_params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, rank: int, targets: str | list[str]) -> int:
        """Adapter parameters: rank x (in + out) per targeted linear layer of every block
        ("all-linear": the attention's q, k, v, o and the MLP's gate, up, down)."""
        h, i = self.hidden, self.intermediate
        sizes = {"q_proj": h + self.q, "k_proj": h + self.kv, "v_proj": h + self.kv,
                 "o_proj": self.q + h, "gate_proj": h + i, "up_proj": h + i,
                 "down_proj": i + h}  # fmt: skip
        names = [targets] if isinstance(targets, str) else list(targets)
        # a qualified name (self_attn.q_proj) counts by its last part; if any target is
        # one the plan cannot place (all-linear, a pattern, another architecture's
        # names), every linear layer counts: an upper bound
        last = [n.split(".")[-1] for n in names]
        known = all(n in sizes for n in last)
        return self.layers * rank * sum(sizes[n] for n in last) if known else (
            self.layers * rank * sum(sizes.values()))  # fmt: skip


@dataclass(frozen=True)
class Plan:
    shape: Shape
    world_size: int
    tokens: int  # per micro-batch
    rows: dict[str, int]  # bytes per GPU, by part
    offloaded: int  # bytes per rank in CPU memory (cpu_offload)
    budget_gb: float | None
    gpu: bool = True
    # colocated (rollout.colocate): the engine's weights on the same GPU while it
    # generates; it sleeps (weights off the GPU, KV cache freed) while the learner steps
    engine_weights: int = 0
    resident: int = 0  # the learner's state that stays on the GPU between steps
    lora_params: int = 0  # adapter parameters (learner.lora), 0 = full fine-tuning

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def generating(self) -> int:
        """Colocated: bytes per GPU while the engine generates, before its KV cache."""
        return self.resident + self.engine_weights

    @property
    def fits(self) -> bool:
        if self.budget_gb is None:
            return True
        return max(self.total, self.generating) <= self.budget_gb * GIB

    def table(self) -> str:
        s = self.shape
        where = "GPU" if self.gpu else "learner process (CPU)"
        adapter = f" + {_count(self.lora_params)} LoRA" if self.lora_params else ""
        lines = [
            f"memory plan per {where}: {_count(s.params)} parameters{adapter}, "
            f"{self.world_size} learner rank(s), {self.tokens:,} tokens per micro-batch",
        ]
        lines += [f"  {name:<26} {_size(b)}" for name, b in self.rows.items()]
        lines.append(f"  {'total':<26} {_size(self.total)}")
        if self.offloaded:
            lines.append(f"  {'in CPU memory (offload)':<26} {_size(self.offloaded)}")
        if self.engine_weights:
            lines += [
                "  colocated engine (asleep while the learner steps, so not in the total):",
                f"    {'learner state kept':<24} {_size(self.resident)}",
                f"    {'engine weights':<24} {_size(self.engine_weights)}",
                f"    {'while generating':<24} {_size(self.generating)} + the engine's KV cache",
            ]
        if self.budget_gb is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {verdict} learner.gpu_memory_gb = {self.budget_gb:g}")
        return "\n".join(lines)


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _size(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:8.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan(
    shape: Shape,
    *,
    world_size: int,
    micro_batch_tokens: int,
    longest_row: int,
    bf16: bool,
    checkpointing: bool,
    logprob_chunk: int | None,
    cpu_offload: bool = False,
    gpu_memory_gb: float | None = None,
    gpu: bool = True,
    pack_mask: bool = False,
    colocated_engine_bytes: int = 0,
    lora_params: int | None = None,
) -> Plan:
    p, w = shape.params, world_size
    compute = 2 if bf16 else 4
    tokens = max(micro_batch_tokens, longest_row)
    part = "" if w == 1 else f", 1/{w}"
    if lora_params is not None:  # LoRA (learner.lora.rank > 0)
        # frozen base weights: bf16 in one unsharded process under bf16 (they never change,
        # so no float32 masters), else float32 shards; float32 adapters train
        base_bytes = 2 if bf16 and w == 1 and not cpu_offload else 4
        a = lora_params
        state = {f"frozen base ({'bf16' if base_bytes == 2 else 'fp32'}{part})": base_bytes * p // w,
                 f"adapter weights (fp32{part})": 4 * a // w,
                 f"adapter gradients (fp32{part})": 4 * a // w,
                 f"AdamW moments (fp32{part})": 8 * a // w}  # fmt: skip
    else:
        base_bytes = 4
        state = {f"weights (fp32{part})": 4 * p // w, f"gradients (fp32{part})": 4 * p // w,
                 f"AdamW moments (fp32{part})": 8 * p // w}  # fmt: skip
    rows = {} if cpu_offload else dict(state)
    if w > 1 or cpu_offload:  # FSDP gathers the root and two layers at a time
        # the root in float32 (its LM-head gradient is summed over log-prob chunks)
        rows["gathered weights"] = 4 * shape.root_params + compute * 2 * shape.layer_params
    elif bf16 and base_bytes == 4:  # autocast keeps a bf16 copy of every weight it casts
        rows["bf16 weight copies"] = 2 * p
    per_token_layer = 4 * shape.hidden + 2 * shape.q + 2 * shape.kv + 4 * shape.intermediate
    if checkpointing:
        acts = tokens * (shape.layers * shape.hidden + per_token_layer) * compute
    else:
        acts = tokens * shape.layers * per_token_layer * compute
    rows["activations"] = acts
    if pack_mask:  # packed rows without flash attention: a T x T boolean mask
        rows["packing mask"] = tokens**2
    chunk = logprob_chunk if logprob_chunk else tokens  # None: the full logits
    rows["log-prob logits"] = 3 * min(chunk, tokens) * shape.vocab * 4
    if gpu:
        rows["reserve (CUDA, NCCL)"] = RESERVE
    offloaded = sum(state.values()) if cpu_offload else 0
    resident = (0 if cpu_offload else sum(state.values())) + (RESERVE if gpu else 0)
    return Plan(shape, w, tokens, rows, offloaded, gpu_memory_gb, gpu,
                colocated_engine_bytes, resident if colocated_engine_bytes else 0,
                lora_params or 0)  # fmt: skip


def plan_for(cfg, model_dir: Path, *, cuda: bool) -> Plan:
    """The plan for a training config whose model lives in ``model_dir``."""
    path = Path(model_dir) / "config.json"
    try:
        shape = Shape.from_config(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise MemoryPlanError(f"cannot read {path}: {e}") from e
    from agent_spo.dist import torchrun_env

    L, R = cfg.learner, cfg.rollout
    longest = R.max_model_len or R.max_response_tokens + PROMPT_ALLOWANCE
    launched = torchrun_env()  # under torchrun its WORLD_SIZE is the world size
    return plan(
        shape,
        world_size=launched[1] if launched else L.world_size,
        micro_batch_tokens=L.micro_batch_tokens,
        longest_row=longest,
        bf16=L.precision == "bfloat16" or (L.precision == "auto" and cuda),
        checkpointing=L.gradient_checkpointing == "on"
        or (L.gradient_checkpointing == "auto" and cuda),
        logprob_chunk=L.logprob_chunk,
        cpu_offload=L.cpu_offload,
        gpu_memory_gb=L.gpu_memory_gb,
        gpu=cuda,
        pack_mask=L.pack == "on",  # "auto" packs only under flash attention (no mask)
        # a colocated engine holds the whole model in its dtype on every GPU it shares
        colocated_engine_bytes=shape.params * _DTYPE_BYTES.get(cfg.model.dtype, 4)
        if R.colocate
        else 0,
        lora_params=shape.lora_params(L.lora.rank, L.lora.target_modules) if L.lora.rank else None,
    )


def check_memory(cfg) -> tuple[Plan | None, list[str]]:
    """The config's memory plan (None when its model directory has no config.json yet,
    e.g. the demo model before its first build) and what is wrong with it, one line
    naming the key. With learner.gpu_memory_gb set the plan is for GPUs (bf16 and
    gradient checkpointing under "auto"); otherwise for this machine."""
    model_dir = Path(cfg.model.path).expanduser() if cfg.model.path else _demo_dir()
    if not (model_dir / "config.json").is_file():
        return None, []
    cuda = cfg.learner.gpu_memory_gb is not None or _cuda()
    try:
        found = plan_for(cfg, model_dir, cuda=cuda)
    except MemoryPlanError as e:
        return None, [f"model.path: {e}"]
    if found.fits:
        return found, []
    if found.total <= (found.budget_gb or 0) * GIB:  # the colocated engine is too much
        return found, [
            f"rollout.colocate: with the engine's weights ({found.engine_weights / GIB:.1f} "
            f"GiB) beside the learner's state, a GPU needs {found.generating / GIB:.1f} GiB "
            f"before any KV cache but has {found.budget_gb:g}: raise learner.world_size, "
            "turn on learner.cpu_offload, or run the engines on other GPUs"
        ]
    return found, [
        f"learner.gpu_memory_gb: the learner needs {found.total / GIB:.1f} GiB per rank "
        f"(see the plan) but a GPU has {found.budget_gb:g}: raise learner.world_size, "
        "lower learner.micro_batch_tokens or learner.logprob_chunk, or turn on "
        "learner.gradient_checkpointing or learner.cpu_offload"
    ]


def _demo_dir() -> Path:
    from agent_spo.demo.build import demo_model_dir

    return demo_model_dir()


def _cuda() -> bool:
    """Whether this machine has an NVIDIA GPU, without importing torch (a dry run stays
    light): the driver's device node."""
    return Path("/dev/nvidiactl").exists()


__all__ = ["MemoryPlanError", "Plan", "Shape", "check_memory", "plan", "plan_for"]
