"""Build the embedded demo policy: tokenizer, tiny Qwen3, supervised warm start (DESIGN §8).

``ensure_demo_model()`` returns the cached model directory, building it on first use
(about seven minutes on 2 cores). The directory is a normal Hugging Face model directory,
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
from agent_spo.demo.demonstrations import answer_text, call_text, demonstration, solution_steps
from agent_spo.episode.formats import get_format
from agent_spo.episode.render import ChatRenderer

FORMATS = ("hermes", "retool")
# The warm start's tasks come from their own seed string, which no run.seed (an int) can
# produce, so training and held-out sets never contain a demonstrated task.
SFT_SEED = "demo-warm-start"


@dataclass(frozen=True)
class DemoModelSettings:
    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    sft_tasks: int = 6000
    copy_steps: int = 600  # stage 1: short-context copying
    sft_steps: int = 600  # stage 2: the real format
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    recipe: int = 6  # bump when demonstrations, tasks or training change

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
    return built_once(
        demo_model_dir(settings), lambda out: build_demo_model(out, settings, log=log)
    )


def built_once(out: Path, build) -> Path:
    """``out``, made by ``build(out)`` under a file lock unless it is already there (its
    demo.json is written last), so concurrent runs build a cached model once."""
    if (out / "demo.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "demo.json").exists():
            build(out)
    return out


class NotADemoDir(ValueError):
    """The output directory holds something other than a demo model."""


def prepare_demo_model(out: Path | None, *, force: bool = False, log=print) -> Path:
    """`agent-spo demo-model`: the cached demo model (``out`` None), or one built in
    ``out``, which must be new, empty or a demo model (kept unless ``force``)."""
    settings = DemoModelSettings()
    if out is None:
        if force:
            shutil.rmtree(demo_model_dir(settings), ignore_errors=True)
        return ensure_demo_model(settings, log=log)
    out = out.resolve()
    is_demo = (out / "demo.json").exists()
    if out.exists() and any(out.iterdir()) and not is_demo:
        raise NotADemoDir(f"{out} exists and is not a demo-model directory; choose a new or "
                          "empty directory")  # fmt: skip
    if is_demo and not force:
        return out
    return build_demo_model(out, settings, log=log)


def number_token_ids(tokenizer) -> set[int]:
    """Ids of the tokens that are digits only (every 1-3 digit group in the demo vocab)."""
    return {i for i in range(len(tokenizer)) if tokenizer.decode([i]).isdigit()}


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
    """Train the tokenizer, then warm-start a random tiny Qwen3 in two stages.

    Stage 1 (copying): solved demonstrations without the system prompt, so the prompt's
    numbers sit among a few dozen tokens; attention learns to copy operands into code and
    tool output into the answer within a few hundred steps. With the ~250-token system
    prompt and tool schema in front, the same skill takes several times longer to appear.
    Stage 2 (the real format): full demonstrations, tool use and guesses, rendered exactly
    as episodes are. A guess's digits carry no loss (they are noise); its decision to
    answer without the tool does.
    """
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
    numbers = number_token_ids(tok)

    full = {f: renderer_for(tok, f) for f in FORMATS}
    stage2: dict[str, list] = {f: [] for f in FORMATS}
    for p, fmt, turns, used in demos:
        ids, mask = _encode(full[fmt], p, turns)
        if not used:  # a guess: keep the choice and the form, not the random digits
            mask = [0 if (k and t in numbers) else k for t, k in zip(ids, mask, strict=True)]
        stage2[fmt].append((ids, mask))
    bare = {
        f: ChatRenderer(tok, get_format(f), tools=None, system_prompt="", enable_thinking=False)
        for f in FORMATS
    }
    stage1: dict[str, list] = {f: [] for f in FORMATS}
    for i, p in enumerate(make_tasks(settings.sft_tasks // 2, seed=SFT_SEED + "-copy")):
        fmt = FORMATS[i % 2]
        turns = [(call_text(fmt, code), out) for code, out in solution_steps(p)]
        stage1[fmt].append(_encode(bare[fmt], p, [*turns, (answer_text(p.answer), None)]))
    log(
        f"demo model: tokenizer of {len(tok)} tokens; {len(tasks)} demonstrations "
        f"({time.perf_counter() - t_start:.0f} s)"
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
    total = settings.copy_steps + settings.sft_steps

    def lr_at(step: int) -> float:  # warm-up, flat through stage 1, cosine to 10% in stage 2
        if step < 20:
            return settings.lr * (step + 1) / 20
        frac = max(0, step - settings.copy_steps) / max(1, settings.sft_steps)
        return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = random.Random(settings.seed + 1)
    # The opening tokens every prompt of a set shares (system prompt, tool schema) run
    # once per step, their keys/values shared by the batch (gradients flow through them).
    prefix = {
        (k, f): _common_prefix([x for x, _ in d[f][:50]])
        for k, d in (("copy", stage1), ("full", stage2))
        for f in FORMATS
    }
    from rich.progress import Progress

    loss = torch.zeros(())
    with Progress(transient=True) as bar:
        task = bar.add_task("warm-starting the demo model", total=total)
        for step in range(total):
            stage, data = ("copy", stage1) if step < settings.copy_steps else ("full", stage2)
            fmt = FORMATS[step % 2]  # one format per batch: similar lengths, little padding
            batch = gen.sample(data[fmt], settings.batch_size)
            loss = _shared_prefix_loss(model, prefix[stage, fmt], batch, tok.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update(
                task, advance=1, description=f"warm-starting ({stage}, loss {loss.item():.3f})"
            )
            if step % 100 == 0 or step == total - 1:
                log(f"  step {step:4d} ({stage})  loss {loss.item():.4f}")

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
