"""Build the embedded demo policy: tokenizer, tiny Qwen3, supervised warm start (DESIGN §8).

``ensure_demo_model()`` returns the cached model directory, building it on first use
(about two minutes on 2 cores). The directory is a normal Hugging Face model directory,
so every engine loads it like any other model.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent_spo.data.problems import Problem
from agent_spo.data.synthetic import make_tasks
from agent_spo.demo.demonstrations import demonstration
from agent_spo.episode.formats import get_format
from agent_spo.episode.render import ChatRenderer

FORMATS = ("hermes", "retool")
SFT_SEED = 1000  # the warm start's tasks come from a seed the training sets never use


@dataclass(frozen=True)
class DemoModelSettings:
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    sft_tasks: int = 6000
    sft_steps: int = 250
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    recipe: int = 1  # bump when demonstrations or training change

    def tag(self) -> str:
        import hashlib

        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def cache_root() -> Path:
    root = os.environ.get("AGENT_SPO_CACHE") or Path.home() / ".cache" / "agent-spo"
    return Path(root)


def demo_model_dir(settings: DemoModelSettings = DemoModelSettings()) -> Path:
    return cache_root() / f"demo-model-{settings.tag()}"


def tool_schemas() -> list[dict]:
    from tools.interpreter import python

    return [python.schema()]


def renderer_for(tokenizer, fmt: str) -> ChatRenderer:
    """The renderer the demo is trained with (and that its configs use)."""
    return ChatRenderer(tokenizer, get_format(fmt), tools=tool_schemas(), enable_thinking=False)


def ensure_demo_model(settings: DemoModelSettings = DemoModelSettings(), *, log=print) -> Path:
    """The cached demo model directory, built under a file lock if missing."""
    out = demo_model_dir(settings)
    if (out / "demo.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "demo.json").exists():
            build_demo_model(out, settings, log=log)
    return out


def _encode(renderer: ChatRenderer, problem: Problem, turns) -> tuple[list[int], list[int]]:
    tok = renderer.tokenizer
    ids = renderer.prompt_ids(problem.problem)
    mask = [0] * len(ids)
    for text, output in turns:
        model = tok(text, add_special_tokens=False).input_ids
        if output is None:
            model = model + [tok.eos_token_id]
        ids += model
        mask += [1] * len(model)
        if output is not None:
            for seg in renderer.observation(output):
                ids += seg.token_ids
                mask += [0] * len(seg.token_ids)
    return ids, mask


def build_demo_model(out: Path, settings: DemoModelSettings, *, log=print) -> Path:
    """Train the tokenizer, then warm-start a random tiny Qwen3 on demonstrations."""
    import torch

    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer

    t_start = time.perf_counter()
    rng = random.Random(settings.seed)
    tasks = make_tasks(settings.sft_tasks, seed=SFT_SEED)
    demos = [
        (p, FORMATS[i % 2], *demonstration(p, FORMATS[i % 2], rng)) for i, p in enumerate(tasks)
    ]

    # Tokenizer: trained on the demonstrations as the chat template renders them, so the
    # fixed system prompt and tool schema compress into few tokens.
    draft = train_tokenizer([p.problem for p in tasks[:200]], vocab_size=300)
    drafts = {f: renderer_for(draft, f) for f in FORMATS}
    corpus = []
    for p, fmt, turns, _ in demos[:3000]:
        corpus.append(
            drafts[fmt].render(drafts[fmt].messages(p.problem), add_generation_prompt=True)
        )
        corpus.extend(text + "\n" + (o or "") for text, o in turns)
    tok = train_tokenizer(corpus, vocab_size=settings.vocab_size)
    renderers = {f: renderer_for(tok, f) for f in FORMATS}
    data = [_encode(renderers[fmt], p, turns) for p, fmt, turns, _ in demos]
    log(
        f"demo model: tokenizer {len(tok)} tokens; {len(data)} demonstrations, "
        f"mean {sum(len(x) for x, _ in data) / len(data):.0f} tokens"
    )

    torch.manual_seed(settings.seed)
    model = random_model(
        tok,
        seed=settings.seed,
        hidden=settings.hidden,
        layers=settings.layers,
        heads=settings.heads,
    ).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    warmup = max(1, settings.sft_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return settings.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, settings.sft_steps - warmup)
        return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    # Batches hold one format each: hermes prompts carry the tool schema and are ~3x
    # longer than retool ones, so mixing them would mostly pad.
    gen = random.Random(settings.seed + 1)

    def batches():
        while True:
            chunks = []
            for fmt in FORMATS:
                idx = [i for i, d in enumerate(demos) if d[1] == fmt]
                gen.shuffle(idx)
                chunks += [
                    idx[k : k + settings.batch_size]
                    for k in range(0, len(idx), settings.batch_size)
                ]
            gen.shuffle(chunks)
            yield from chunks

    stream = batches()
    # The system prompt and tool schema open every prompt of a format; they are run once
    # per step and their keys/values shared by the batch (gradients flow through them),
    # which makes a step ~5x cheaper than running ~260 identical tokens per row.
    prefix = {f: _common_prefix([x for (x, _), d in zip(data, demos, strict=True) if d[1] == f][:50])
              for f in FORMATS}  # fmt: skip
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("warm-starting the demo model", total=settings.sft_steps)
        for step in range(settings.sft_steps):
            chosen = next(stream)
            fmt = demos[chosen[0]][1]
            loss = _shared_prefix_loss(
                model, prefix[fmt], [data[i] for i in chosen], tok.pad_token_id
            )
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update(
                task,
                advance=1,
                description=f"warm-starting the demo model (loss {loss.item():.3f})",
            )
            if step % 100 == 0 or step == settings.sft_steps - 1:
                log(f"  step {step:4d}  loss {loss.item():.4f}")

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model.eval(), tok, tmp)
    meta = {
        "settings": asdict(settings),
        "final_loss": loss.item(),
        "build_s": round(time.perf_counter() - t_start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "formats": list(FORMATS),
    }
    (tmp / "demo.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"demo model: built in {meta['build_s']} s -> {out}")
    return out


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    n = min(len(x) for x in seqs)
    k = next((i for i in range(n) if len({x[i] for x in seqs}) > 1), n)
    return list(seqs[0][:k])


def _shared_prefix_loss(model, prefix: list[int], batch, pad_id: int):
    """Mean next-token cross-entropy on the trainable tokens of rows sharing `prefix`."""
    import torch

    lp = len(prefix)
    out = model(input_ids=torch.tensor([prefix]), use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(batch))
    rows = [(x[lp:], m[lp:]) for x, m in batch]
    n = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), lp + n), dtype=torch.long)
    att[:, :lp] = 1
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (x, m) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, lp : lp + len(x)] = 1
        lab[i, : len(x)] = torch.tensor([t if k else -100 for t, k in zip(x, m, strict=True)])
    pos = torch.arange(lp, lp + n)[None].expand(len(rows), n)
    logits = model(
        input_ids=ids, attention_mask=att, position_ids=pos, past_key_values=cache
    ).logits  # [B, n, V]
    # the first suffix token is the user's text (never trainable), so in-suffix shifting
    # loses no label
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1)
    )
