"""The transformers engine: exact log-probs, stops, batching, weight updates, errors."""

from __future__ import annotations

import asyncio

import pytest
import torch

from agent_spo.engines.base import EngineError, Sampling
from agent_spo.engines.hf import HFEngine


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval(), tok


def _engine(model_and_tok, **kw) -> HFEngine:
    import copy

    model, tok = model_and_tok
    return HFEngine(copy.deepcopy(model), tok, **kw)


def _forward_logprobs(model, prompt, tokens) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return lp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def _prompts(tok, n):
    return [tok(f"What is {100 + i} multiplied by {7 * i + 3}?").input_ids for i in range(n)]


def test_logprobs_match_a_forward_pass_under_staggered_batching(model_and_tok):
    """Rows admitted mid-batch (merged, left-padded caches) still score exactly."""
    model, tok = model_and_tok
    prompts = _prompts(tok, 12)

    async def main():
        e = _engine(model_and_tok, max_batch=8)
        tasks = []
        for i, p in enumerate(prompts):
            tasks.append(
                asyncio.create_task(e.generate(p, Sampling(max_tokens=10 + 3 * i, seed=i)))
            )
            await asyncio.sleep(0.003 * (i % 3))  # arrive while others decode
        gens = await asyncio.gather(*tasks)
        stats = dict(e.stats)
        await e.close()
        return gens, stats

    gens, stats = asyncio.run(main())
    assert stats["prefills"] > 1 and stats["max_rows"] > 1  # batched, with later admissions
    for p, g in zip(prompts, gens, strict=True):
        ref = _forward_logprobs(model, p, g.token_ids)
        assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4), (ref, g.logprobs)
        assert g.finish_reason in ("length", "stop")


def test_greedy_equals_transformers_generate(model_and_tok):
    model, tok = model_and_tok
    prompt = _prompts(tok, 1)[0]

    async def main():
        e = _engine(model_and_tok)
        g = await e.generate(prompt, Sampling(max_tokens=12, temperature=0))
        await e.close()
        return g

    g = asyncio.run(main())
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    assert list(g.token_ids) == ref[: len(g.token_ids)]


def test_max_tokens_and_seeded_sampling(model_and_tok):
    _, tok = model_and_tok
    prompt = _prompts(tok, 1)[0]

    async def main():
        e = _engine(model_and_tok)
        a = await e.generate(prompt, Sampling(max_tokens=7, seed=3, stop_token_ids=()))
        b = await e.generate(prompt, Sampling(max_tokens=7, seed=3))
        c = await e.generate(prompt, Sampling(max_tokens=7, seed=4))
        await e.close()
        return a, b, c

    a, b, c = asyncio.run(main())
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    if a.finish_reason == "length":
        assert len(a.token_ids) == 7 and a.stop is None
    assert a.policy_version == 0
    assert len(c.token_ids) >= 1 and c.policy_version == 0


def test_stop_strings_and_stop_tokens_end_on_the_completing_token(model_and_tok):
    """Whatever the model samples, the turn ends at the first stop and includes its token."""
    _, tok = model_and_tok
    prompt = _prompts(tok, 1)[0]

    async def main():
        e = _engine(model_and_tok)
        free = await e.generate(prompt, Sampling(max_tokens=40, temperature=0))
        text = tok.decode(free.token_ids)
        # a stop string that the greedy continuation is known to contain
        stop = text[len(text) // 2 : len(text) // 2 + 2] or text
        s = await e.generate(prompt, Sampling(max_tokens=40, temperature=0, stop=(stop,)))
        # a stop token: the greedy continuation's third token
        t = await e.generate(
            prompt, Sampling(max_tokens=40, temperature=0, stop_token_ids=(free.token_ids[2],))
        )
        await e.close()
        return free, stop, s, t

    free, stop, s, t = asyncio.run(main())
    assert s.finish_reason == "stop" and s.stop == stop
    assert stop in tok.decode(s.token_ids) and stop not in tok.decode(s.token_ids[:-1])
    assert s.token_ids == free.token_ids[: len(s.token_ids)]
    k = free.token_ids.index(free.token_ids[2])
    assert t.finish_reason == "stop" and t.stop == free.token_ids[2]
    assert t.token_ids == free.token_ids[: k + 1]


def test_weight_update_changes_outputs_and_version(model_and_tok):
    model, tok = model_and_tok
    prompt = _prompts(tok, 1)[0]
    from agent_spo.demo.model import random_model

    other = random_model(tok, seed=123, hidden=64, layers=2, heads=4)

    async def main():
        e = _engine(model_and_tok)
        before = await e.generate(prompt, Sampling(max_tokens=16, temperature=0))
        await e.update_weights(other.state_dict().items(), version=5)
        after = await e.generate(prompt, Sampling(max_tokens=16, temperature=0))
        v = e.version
        await e.close()
        return before, after, v

    before, after, v = asyncio.run(main())
    assert v == 5 and after.policy_version == 5 and before.policy_version == 0
    assert before.logprobs != after.logprobs
    ref = _forward_logprobs(other, prompt, after.token_ids)
    assert torch.allclose(ref, torch.tensor(after.logprobs), atol=1e-4)


def test_unknown_weight_name_is_an_error(model_and_tok):
    async def main():
        e = _engine(model_and_tok)
        with pytest.raises(KeyError, match="no weight named"):
            await e.update_weights([("nope.weight", torch.zeros(1))], version=1)
        await e.close()

    asyncio.run(main())


def test_prompt_over_the_context_limit_is_refused(model_and_tok):
    _, tok = model_and_tok

    async def main():
        e = _engine(model_and_tok, max_model_len=8)
        with pytest.raises(ValueError, match="max_model_len"):
            await e.generate(list(range(3, 11)), Sampling(max_tokens=4))
        g = await e.generate([3, 4, 5, 6, 7, 8], Sampling(max_tokens=50))
        await e.close()
        return g

    g = asyncio.run(main())
    assert len(g.token_ids) <= 2  # clamped to the room left under max_model_len


def test_a_failing_model_fails_requests_with_engine_error(model_and_tok):
    async def main():
        e = _engine(model_and_tok)

        def boom(*a, **k):
            raise RuntimeError("simulated device failure")

        e.model.forward = boom
        with pytest.raises(EngineError, match="simulated device failure"):
            await e.generate([3, 4, 5], Sampling(max_tokens=4))
        await e.close()
        with pytest.raises(EngineError, match="closed"):
            await e.generate([3, 4, 5], Sampling(max_tokens=4))

    asyncio.run(main())


def test_sampling_rejects_bad_values():
    with pytest.raises(ValueError, match="max_tokens"):
        Sampling(max_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        Sampling(max_tokens=1, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(max_tokens=1, top_p=0)


def test_close_fails_in_flight_requests_instead_of_hanging(model_and_tok):
    _, tok = model_and_tok
    prompts = _prompts(tok, 4)

    async def main():
        e = _engine(model_and_tok)
        tasks = [asyncio.create_task(e.generate(p, Sampling(max_tokens=2000, stop_token_ids=(),
                                                              temperature=1.0, seed=1)))
                 for p in prompts]  # fmt: skip
        await asyncio.sleep(0.2)  # decoding now
        await e.close()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        with pytest.raises(EngineError, match="closed"):
            await e.update_weights([], version=1)
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, EngineError) for r in results), results


def test_a_cancelled_caller_frees_its_row(model_and_tok):
    _, tok = model_and_tok
    prompt = _prompts(tok, 1)[0]

    async def main():
        e = _engine(model_and_tok, max_model_len=4096)
        long = asyncio.create_task(
            e.generate(prompt, Sampling(max_tokens=3000, temperature=1.0, seed=2))
        )
        await asyncio.sleep(0.2)
        long.cancel()
        steps_at_cancel = e.stats["steps"]
        short = await e.generate(prompt, Sampling(max_tokens=5, temperature=0))
        await asyncio.sleep(0.1)
        steps_after = e.stats["steps"]
        await e.close()
        return steps_at_cancel, steps_after, short

    at_cancel, after, short = asyncio.run(main())
    assert len(short.token_ids) <= 5
    assert after - at_cancel < 50  # the cancelled row did not keep decoding to 3000


def test_a_bad_update_leaves_the_old_weights(model_and_tok):
    model, tok = model_and_tok
    prompt = _prompts(tok, 1)[0]
    from agent_spo.demo.model import random_model

    other = random_model(tok, seed=7, hidden=64, layers=2, heads=4).state_dict()

    async def main():
        e = _engine(model_and_tok)
        before = await e.generate(prompt, Sampling(max_tokens=8, temperature=0))
        bad = [*list(other.items())[:3], ("model.norm.weight", torch.zeros(3))]
        with pytest.raises(ValueError, match="shape"):
            await e.update_weights(bad, version=9)
        after = await e.generate(prompt, Sampling(max_tokens=8, temperature=0))
        v = e.version
        await e.close()
        return before, after, v

    before, after, v = asyncio.run(main())
    assert v == 0 and before == after


def test_multibyte_stop_strings_are_found(model_and_tok):
    """A stop string of many byte-level tokens (non-ASCII) still ends the turn."""
    _, tok = model_and_tok
    prompt = _prompts(tok, 1)[0]
    stop = "答案是"
    stop_ids = tok(stop, add_special_tokens=False).input_ids
    assert len(stop_ids) > len(stop) + 4  # longer than a window counted in characters

    async def main():
        e = _engine(model_and_tok)
        # force the stop string: make the model emit exactly these tokens, greedily
        steps = iter(stop_ids + [tok.eos_token_id] * 10)
        forward = e.model.forward

        def forced(*a, **k):
            out = forward(*a, **k)
            t = next(steps)
            out.logits[:, -1, :] = -1e9
            out.logits[:, -1, t] = 0.0
            return out

        e.model.forward = forced
        g = await e.generate(prompt, Sampling(max_tokens=40, temperature=0, stop=(stop,)))
        await e.close()
        return g

    g = asyncio.run(main())
    assert g.finish_reason == "stop" and g.stop == stop
    assert list(g.token_ids) == stop_ids


def _chat_prompts(tok, n):
    """Prompts that open with the same long system text, as episodes do."""
    system = tok("You are a careful solver. Use the python tool for arithmetic. " * 4).input_ids
    return [
        system + tok(f"What is {100 + i} multiplied by {7 * i + 3}?").input_ids for i in range(n)
    ]


def test_shared_prefix_is_cached_and_scores_exactly(model_and_tok):
    """Prompts sharing an opening reuse its keys/values; tokens and log-probs are unchanged."""
    model, tok = model_and_tok
    # plus two prompts without the opening, admitted with the others: one prefill then
    # runs two forward passes (cached opening, and in full) and merges them
    others = [tok(f"{i} apples and {3 * i} pears?").input_ids for i in (4, 9)]
    prompts = _chat_prompts(tok, 10) + others

    async def run(prefix_cache: bool):
        e = _engine(model_and_tok, max_batch=6, prefix_cache=prefix_cache, min_prefix=16)
        tasks = []
        for i, p in enumerate(prompts):
            s = Sampling(max_tokens=6 + 2 * i, temperature=0)
            tasks.append(asyncio.create_task(e.generate(p, s)))
            await asyncio.sleep(0.003 * (i % 3))
        gens = await asyncio.gather(*tasks)
        stats = dict(e.stats)
        await e.close()
        return gens, stats

    cached, stats = asyncio.run(run(True))
    plain, plain_stats = asyncio.run(run(False))
    shared = len(
        tok("You are a careful solver. Use the python tool for arithmetic. " * 4).input_ids
    )
    assert stats["prefix_tokens"] >= shared * (len(prompts) - 3)  # all but the first reuse it
    assert plain_stats["prefix_tokens"] == 0
    for p, a, b in zip(prompts, cached, plain, strict=True):
        assert a.token_ids == b.token_ids
        ref = _forward_logprobs(model, p, a.token_ids)
        assert torch.allclose(ref, torch.tensor(a.logprobs), atol=1e-4), (ref, a.logprobs)


def test_shared_prefix_is_recomputed_after_a_weight_update(model_and_tok):
    """After new weights arrive, the cached opening is the new weights' (exact log-probs)."""
    model, tok = model_and_tok
    prompts = _chat_prompts(tok, 4)
    import copy

    new_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    async def main():
        e = _engine(model_and_tok, min_prefix=16)
        first = await asyncio.gather(
            *(e.generate(p, Sampling(max_tokens=5, seed=1)) for p in prompts)
        )
        await e.update_weights(new_model.state_dict().items(), version=1)
        second = await asyncio.gather(
            *(e.generate(p, Sampling(max_tokens=5, seed=1)) for p in prompts)
        )
        # the old weights again under the same version number (a reload, a rollback)
        await e.update_weights(model.state_dict().items(), version=1)
        third = await asyncio.gather(
            *(e.generate(p, Sampling(max_tokens=5, seed=1)) for p in prompts)
        )
        stats = dict(e.stats)
        await e.close()
        return first, second, third, stats

    first, second, third, stats = asyncio.run(main())
    assert stats["prefix_tokens"] > 0
    for weights, gens in ((new_model, second), (model, third)):
        for p, g in zip(prompts, gens, strict=True):
            assert g.policy_version == 1
            ref = _forward_logprobs(weights, p, g.token_ids)
            assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4)


def test_prompts_without_a_shared_opening_are_prefilled_in_full(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok(f"{i} apples and {3 * i} pears: how many fruits?").input_ids for i in range(5)]

    async def main():
        e = _engine(model_and_tok, min_prefix=16)
        gens = await asyncio.gather(
            *(e.generate(p, Sampling(max_tokens=4, seed=i)) for i, p in enumerate(prompts))
        )
        stats = dict(e.stats)
        await e.close()
        return gens, stats

    gens, stats = asyncio.run(main())
    assert stats["prefix_tokens"] == 0
    for p, g in zip(prompts, gens, strict=True):
        ref = _forward_logprobs(model, p, g.token_ids)
        assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4)


def test_prefix_cache_is_off_for_models_with_other_than_full_attention(model_and_tok):
    import copy

    model, tok = model_and_tok
    sliding = copy.deepcopy(model)
    sliding.config.layer_types = ["sliding_attention"] * len(sliding.config.layer_types)
    assert HFEngine(sliding, tok)._prefix is None
    assert HFEngine(copy.deepcopy(model), tok)._prefix is not None
    assert HFEngine(copy.deepcopy(model), tok, prefix_cache=False)._prefix is None
