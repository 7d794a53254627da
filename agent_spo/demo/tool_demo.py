"""The tool demo: the demo model, taught to call a tool of yours (docs/tools.md).

The ~1M-parameter demo model knows only what it was shown, so it cannot call a new tool
from its schema alone the way Qwen3 does. The tool demo gives it a short second warm
start on the ``base_digits`` tasks ("the sum of the digits of N written in base B"),
whose demonstrations call *your* tool, as `agent-spo tools new` writes it, with ``n``
and ``base`` (real calls: each demonstrated output is what your function returned in
the sandbox), and otherwise guess, as the plain demo does. Reinforcement learning then has the same
thing to learn: call the tool. The prompts are rendered with the run's own tool list.

The result is cached beside the demo model, keyed by the tool file's contents, the
tools offered and the settings.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent_spo.data.problems import Problem
from agent_spo.data.synthetic import make_tasks
from agent_spo.demo.build import (
    _common_prefix,
    _encode,
    _shared_prefix_loss,
    built_once,
    cache_root,
)
from agent_spo.demo.demonstrations import answer_text, wrong_guess

TOOL_SEED = "tool-demo-warm-start"  # no run.seed (an int) makes these tasks
SHARE = 0.55  # probability a demonstration calls the tool, minus 0.05 per level


@dataclass(frozen=True)
class ToolDemoSettings:
    tasks: int = 3000
    copy_steps: int = 150  # calls without the system prompt: copying n and base
    steps: int = 250  # the real format: the run's tools, calls and guesses
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    recipe: int = 1  # bump when demonstrations or training change


def check_demo_tool(ref: str):
    """The one tool ``ref`` names, if the tool demo can call it (integer ``n`` and
    ``base``, as the template has them); else ValueError saying what is missing."""
    from tools.refs import resolve

    tools = resolve([ref]).tools
    if len(tools) != 1:
        raise ValueError(
            f"{ref!r} offers {len(tools)} tools; name one ({ref.partition(':')[0]}:FUNCTION)"
        )
    tool = tools[0]
    props = tool.parameters["properties"]
    wrong = [k for k in ("n", "base") if props.get(k, {}).get("type") != "integer"]
    wrong += [k for k in tool.parameters.get("required", []) if k not in ("n", "base")]
    if wrong or tool.kind != "function":
        raise ValueError(
            f"the tool demo calls {tool.name!r} with the integers n and base only, as "
            f"the template of `agent-spo tools new` takes them; it takes "
            + (", ".join(f"{k}: {v.get('type')}" for k, v in props.items()) or "nothing")
        )
    return tool


def demo_problem_level(problem: Problem) -> int:
    return int(problem.source.rsplit("level", 1)[1])


def tool_text(name: str, n: int, base: int) -> str:
    return (
        "<tool_call>\n"
        + json.dumps({"name": name, "arguments": {"n": n, "base": base}})
        + ("\n</tool_call>")
    )


def operands(problem: Problem) -> tuple[int, int]:
    """(n, base) of a base_digits task."""
    import re

    n, base = (int(x) for x in re.findall(r"\d+", problem.problem))
    return n, base


def demonstration(problem: Problem, tool, output: str, rng: random.Random):
    """Turns ``[(model text, tool output or None), ...]`` and whether the tool was used;
    ``output`` is what the tool returned for this task in the sandbox (capped)."""
    if rng.random() < SHARE - 0.05 * demo_problem_level(problem):
        n, base = operands(problem)
        return [(tool_text(tool.name, n, base), output), (answer_text(problem.answer), None)], True
    return [(answer_text(wrong_guess(problem.answer, rng)), None)], False


# One sandbox call answers a chunk of tasks: the tool runs there, as in training.
_BATCH_CELL = """\
import importlib, json
from tools.sdk import result_text
t = getattr(importlib.import_module({module!r}), {attr!r})
out = []
for n, base in json.loads({pairs!r}):
    try:
        out.append(["ok", result_text(t, t.fn(n=n, base=base))])
    except Exception as e:  # the user's tool may raise anything: the build reports it
        out.append(["error", f"{{type(e).__name__}}: {{e}}"])
print(json.dumps(out))
"""


def sandbox_outputs(ref: str, tool, problems: list[Problem], chunk: int = 500) -> list[str]:
    """What ``tool`` returns for each task's (n, base), computed in a local sandbox that
    shows its module as training does. Raises ValueError, naming the call, when the tool
    fails on one: the demonstrations need its answers."""
    import asyncio
    import concurrent.futures

    from sandboxes.local import Limits, LocalSandbox
    from tools.refs import resolve

    pairs = [operands(p) for p in problems]

    async def run() -> list[str]:
        limits = Limits(timeout_s=120, max_output=1 << 23, hard_output=1 << 24)
        sandbox = LocalSandbox(workers=1, limits=limits, tool_sources=resolve([ref]).sources)
        out: list[str] = []
        async with sandbox:
            for i in range(0, len(pairs), chunk):
                cell = _BATCH_CELL.format(
                    module=tool.module, attr=tool.fn.__name__,
                    pairs=json.dumps(pairs[i : i + chunk]),
                )  # fmt: skip
                result = await sandbox.run(cell)
                if not result.ok:
                    raise ValueError(
                        f"the tool demo could not call {tool.name!r} in the sandbox: "
                        f"{result.status}: {result.exc_type}: {result.exc_message}"
                    )
                for (n, base), (kind, text) in zip(
                    pairs[i : i + chunk], json.loads(result.stdout), strict=True
                ):
                    if kind != "ok":
                        raise ValueError(
                            f"the tool demo called {tool.name}(n={n}, base={base}) in the "
                            f"sandbox and it failed: {text}; the demonstrations need its "
                            "answers"
                        )
                    out.append(text)
        return out

    # its own loop on its own thread: the trainer calls this from inside its event loop
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def tool_demo_dir(ref: str, offered: list[str], chars: int, settings: ToolDemoSettings) -> Path:
    from agent_spo.demo.build import demo_model_dir
    from tools.refs import resolve

    found = resolve(offered)
    blob = json.dumps(
        {
            "base": demo_model_dir().name,
            "settings": asdict(settings),
            "schemas": [t.schema() for t in found.tools],
            "sources": [_digest(s.path) for s in found.sources],
            "tool": resolve([ref]).tools[0].name,
            "chars": chars,
        },
        sort_keys=True,
    ).encode()
    return cache_root() / f"tool-demo-{hashlib.sha256(blob).hexdigest()[:10]}"


def _digest(path: str | None) -> str | None:
    """The contents of a tool file (or every .py file of a package), hashed."""
    if path is None:
        return None
    p = Path(path)
    files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def ensure_tool_demo_model(
    ref: str, offered: list[str], chars: int = 256, *, settings=ToolDemoSettings(), log=print
) -> Path:
    """The cached tool-demo model for tool ``ref`` among the ``offered`` tools, built
    (under a file lock) from the demo model if missing."""
    return built_once(
        tool_demo_dir(ref, offered, chars, settings),
        lambda out: build_tool_demo_model(out, ref, offered, chars, settings, log=log),
    )


def build_tool_demo_model(
    out: Path, ref: str, offered: list[str], chars: int, settings: ToolDemoSettings, *, log=print
) -> Path:
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_spo.demo.build import ensure_demo_model, number_token_ids
    from agent_spo.demo.model import save_model_dir
    from agent_spo.episode.formats import get_format
    from agent_spo.episode.render import ChatRenderer
    from agent_spo.episode.toolbox import truncate_middle
    from tools.refs import resolve

    t0 = time.perf_counter()
    base = ensure_demo_model(log=log)
    tool = check_demo_tool(ref)
    schemas = [t.schema() for t in resolve(offered).tools]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
    full = ChatRenderer(tok, get_format("hermes"), tools=schemas, enable_thinking=False)
    bare = ChatRenderer(tok, get_format("hermes"), tools=None, system_prompt="",
                        enable_thinking=False)  # fmt: skip
    numbers = number_token_ids(tok)
    rng = random.Random(settings.seed)
    stages: dict[str, list] = {"copy": [], "full": []}
    tasks = make_tasks(settings.tasks, seed=TOOL_SEED, families=("base_digits",))
    for p, output in zip(tasks, sandbox_outputs(ref, tool, tasks), strict=True):
        output = truncate_middle(output, chars)  # what the model reads
        turns, used = demonstration(p, tool, output, rng)
        ids, mask = _encode(full, p, turns)
        if not used:  # a guess: keep the choice, not the random digits
            mask = [0 if (k and t in numbers) else k for t, k in zip(ids, mask, strict=True)]
        stages["full"].append((ids, mask))
        n, b = operands(p)
        solved = [(tool_text(tool.name, n, b), output), (answer_text(p.answer), None)]
        stages["copy"].append(_encode(bare, p, solved))
    prefix = {k: _common_prefix([x for x, _ in v[:50]]) for k, v in stages.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    gen = random.Random(settings.seed + 1)
    total = settings.copy_steps + settings.steps
    loss = torch.zeros(())
    log(f"tool demo: teaching the demo model to call {tool.name!r} ({total} steps)")
    with Progress(transient=True) as bar:
        task = bar.add_task("warm-starting the tool demo", total=total)
        for step in range(total):
            stage = "copy" if step < settings.copy_steps else "full"
            batch = gen.sample(stages[stage], settings.batch_size)
            loss = _shared_prefix_loss(model, prefix[stage], batch, tok.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update(task, advance=1, description=f"tool demo ({stage}, loss {loss.item():.3f})")
            if step % 100 == 0 or step == total - 1:
                log(f"  step {step:4d} ({stage})  loss {loss.item():.4f}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model.eval(), tok, tmp)
    meta = {
        "tool": tool.name,
        "reference": ref,
        "offered": offered,
        "settings": asdict(settings),
        "final_loss": loss.item(),
        "build_s": round(time.perf_counter() - t0, 1),
    }
    (tmp / "demo.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"tool demo: built in {meta['build_s']} s -> {out}")
    return out
