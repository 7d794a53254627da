"""The replica pool over real `agent-spo engine serve` processes on 127.0.0.1: routing,
weight sync, a generation spanning an update, a killed and a hung replica."""

from __future__ import annotations

import asyncio
import copy
import signal
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from agent_spo.engines.base import EngineError, Sampling, affinity
from agent_spo.engines.pool import ReplicaPool, status
from agent_spo.engines.replicas import LocalReplica, free_port

pytestmark = pytest.mark.slow

MAX_LEN = 256


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    logs = tmp_path_factory.mktemp("replica_logs")
    replicas = [
        LocalReplica(
            tiny_model_dir,
            extra=["--max-model-len", str(MAX_LEN)],
            log_path=logs / f"replica{i}.log",
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        for r in replicas:
            r.start()
        yield SimpleNamespace(replicas=replicas, tok=tok, model=model,
                              sync_dir=tmp_path_factory.mktemp("sync"))  # fmt: skip
    finally:
        for r in replicas:
            r.stop()


@pytest.fixture()
def fresh(fleet):
    """Every replica alive and back on the starting weights (version 0)."""
    for r in fleet.replicas:
        r.signal(signal.SIGCONT)
        if r.proc is None or r.proc.poll() is not None:
            r.start()
        version = httpx.get(r.url + "/weight_info").json()["weight_version"]
        if version != "0":
            r.kill()
            r.start()
    return fleet


def _perturbed(model, seed: int):
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return other


def _forward_logprobs(model, prompt, tokens) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return lp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def _prompt(tok, i: int = 0) -> list[int]:
    return tok(f"What is {100 + i} multiplied by {7 * i + 3}?").input_ids


def _pool(fleet, **kw) -> ReplicaPool:
    kw.setdefault("sync_dir", fleet.sync_dir)
    kw.setdefault("probe_s", 0.2)
    return ReplicaPool([r.url for r in fleet.replicas], **kw)


def test_episodes_spread_over_replicas_and_each_stays_on_one(fresh):
    keys = [object() for _ in range(8)]

    async def episode(pool, i):
        with affinity(keys[i]):
            prompt = _prompt(fresh.tok, i)
            for turn in range(3):
                gen = await pool.generate(prompt, Sampling(max_tokens=6, seed=i * 10 + turn))
                prompt = prompt + list(gen.token_ids)

    async def main():
        async with _pool(fresh) as pool:
            await pool.start()
            await asyncio.gather(*(episode(pool, i) for i in range(8)))
            return {k: pool._affinity[k].index for k in keys}, status(pool), pool.metrics()

    where, rows, metrics = asyncio.run(main())
    per_replica = [sum(1 for k in keys if where[k] == i) for i in range(2)]
    assert min(per_replica) >= 2  # both replicas took episodes
    # every turn of an episode went where its first did
    assert [row["requests"] for row in rows] == [3 * n for n in per_replica]
    assert metrics["rollout/replica_drops"] == 0 and metrics["rollout/replicas_live"] == 2


@pytest.mark.parametrize("transport", ["disk", "gloo"])
def test_a_sync_reaches_every_replica_and_they_sample_the_synced_weights(fresh, transport):
    other = _perturbed(fresh.model, 1)
    for p in fresh.sync_dir.iterdir():
        import shutil

        shutil.rmtree(p)

    async def main():
        async with _pool(fresh, transport=transport) as pool:
            await pool.start()
            await pool.update_weights(other.state_dict().items(), 1)
            gens = []
            for i in range(6):
                with affinity(object()):
                    gens.append(await pool.generate(_prompt(fresh.tok, i),
                                                    Sampling(max_tokens=10, seed=i)))  # fmt: skip
            return pool.version, gens, status(pool), pool.metrics()

    version, gens, rows, metrics = asyncio.run(main())
    assert version == 1
    assert [httpx.get(r.url + "/weight_info").json()["weight_version"]
            for r in fresh.replicas] == ["1", "1"]  # fmt: skip
    assert all(row["requests"] >= 1 for row in rows)  # both replicas sampled
    for i, g in enumerate(gens):
        assert g.policy_version == 1 and g.versions is None
        want = _forward_logprobs(other, _prompt(fresh.tok, i), g.token_ids)
        assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4)
    assert metrics["perf/weight_sync_bytes"] > 0 and metrics["perf/weight_sync_s"] > 0
    assert metrics["rollout/replica0_version"] == metrics["rollout/replica1_version"] == 1
    written = sorted(p.name for p in fresh.sync_dir.iterdir())
    assert written == (["v000001"] if transport == "disk" else [])  # gloo: nothing on disk


def test_an_update_mid_generation_splits_the_tokens_by_version(fresh):
    """A long generation with an update landing part-way: its first tokens carry the old
    version (and the old model's log-probs), the rest the new one."""
    prompt = _prompt(fresh.tok, 3)
    # a seed whose sample runs long (the tiny random model stops at random)
    sampling = next(
        s for s in (Sampling(max_tokens=220, seed=k) for k in range(40))
        if len(_sample_direct(fresh, prompt, s)) > 150
    )  # fmt: skip

    async def main():
        async with _pool(fresh) as pool:
            await pool.start()
            for attempt, delay in enumerate((0.05, 0.1, 0.2, 0.02, 0.3)):
                task = asyncio.create_task(pool.generate(prompt, sampling))
                await asyncio.sleep(delay)
                new = _perturbed(fresh.model, 10 + attempt)
                await pool.update_weights(new.state_dict().items(), pool.version + 1)
                gen = await task
                if gen.versions is not None:
                    return gen, pool.version
        pytest.fail("no update landed mid-generation in 5 tries")

    gen, version = asyncio.run(main())
    (a, b, old), (b2, n, newer) = gen.runs()
    assert a == 0 and b == b2 and n == len(gen.token_ids) and newer == version == old + 1
    assert gen.policy_version == old
    if old == 0:  # the tokens before the update are the starting model's
        want = _forward_logprobs(fresh.model, prompt, gen.token_ids[:b])
        assert torch.allclose(torch.tensor(gen.logprobs[:b]), want, atol=1e-4)


def _sample_direct(fleet, prompt, sampling) -> tuple[int, ...]:
    async def main():
        async with ReplicaPool([fleet.replicas[0].url]) as pool:
            return (await pool.generate(prompt, sampling)).token_ids

    return asyncio.run(main())


@pytest.mark.parametrize("transport", ["disk", "gloo"])
def test_a_killed_replica_loses_no_request_and_rejoins_on_the_pools_weights(fresh, transport):
    """disk: a restarted replica loads the current version and rejoins at once; gloo: no
    copy of it is kept, so it rejoins at the next sync."""
    other = _perturbed(fresh.model, 2)
    victim = fresh.replicas[1]

    async def main():
        async with _pool(fresh, transport=transport) as pool:
            await pool.start()
            tasks = []
            for i in range(12):
                with affinity(object()):
                    tasks.append(asyncio.create_task(pool.generate(
                        _prompt(fresh.tok, i), Sampling(max_tokens=200, seed=i))))  # fmt: skip
            # killed while it holds requests (a fixed wait could outlast generations that
            # sample their end early, and then no request would find it dead)
            deadline = time.monotonic() + 60
            while pool.replicas[1].outstanding == 0:  # noqa: ASYNC110 - the pool's own count
                assert time.monotonic() < deadline, "no request reached replica 1"
                await asyncio.sleep(0.005)
            victim.kill()
            gens = await asyncio.gather(*tasks)  # none lost: moved to the other replica
            drops = pool.metrics()["rollout/replica_drops"]
            assert not pool.replicas[1].live
            t0 = time.monotonic()
            await pool.update_weights(other.state_dict().items(), 1)  # the dead one is skipped
            sync_s = time.monotonic() - t0
            victim.start()  # back on the starting weights, version 0
            if transport == "gloo":
                while not pool.replicas[1].stale:  # noqa: ASYNC110 - the probe's finding
                    await asyncio.sleep(0.1)
                assert not pool.replicas[1].live  # it holds v0: not until the next sync
                await pool.update_weights(other.state_dict().items(), 2)
            deadline = time.monotonic() + 60
            while not pool.replicas[1].live and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            rejoined = status(pool)[1]
            before = pool.replicas[1].requests  # the fewest: the next episode goes there
            with affinity(object()):
                after_gen = await pool.generate(_prompt(fresh.tok), Sampling(max_tokens=4))
            assert pool.replicas[1].requests == before + 1
            assert after_gen.policy_version == pool.version
            return gens, drops, sync_s, rejoined, pool.version

    gens, drops, sync_s, rejoined, version = asyncio.run(main())
    assert len(gens) == 12 and drops >= 1
    assert sync_s < 30
    want = 1 if transport == "disk" else 2
    assert rejoined["live"] and rejoined["version"] == version == want
    assert httpx.get(victim.url + "/weight_info").json()["weight_version"] == str(want)


@pytest.mark.parametrize("transport", ["disk", "gloo"])
def test_a_hung_replica_fails_its_sync_within_the_timeout_and_the_run_goes_on(fresh, transport):
    other = _perturbed(fresh.model, 3)
    hung = fresh.replicas[1]

    async def main():
        async with _pool(fresh, sync_timeout_s=2.0, transport=transport) as pool:
            await pool.start()
            hung.signal(signal.SIGSTOP)
            t0 = time.monotonic()
            await pool.update_weights(other.state_dict().items(), 1)
            sync_s = time.monotonic() - t0
            out = status(pool)[1]
            with affinity(object()):
                gen = await pool.generate(_prompt(fresh.tok), Sampling(max_tokens=5, seed=0))
            hung.signal(signal.SIGCONT)
            if transport == "gloo":  # rejoins at the next sync
                while not pool.replicas[1].stale:  # noqa: ASYNC110 - the probe's finding
                    await asyncio.sleep(0.1)
                await pool.update_weights(other.state_dict().items(), 2)
            deadline = time.monotonic() + 60
            while not pool.replicas[1].live and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            return sync_s, out, gen, status(pool)[1], pool.version

    sync_s, out, gen, back, version = asyncio.run(main())
    assert sync_s < 10  # 2 s to answer, plus the write and the healthy replica's load
    assert not out["live"] and "no answer within" in out["why_out"], out["why_out"]
    assert gen.policy_version == 1  # served by the healthy replica
    want = 1 if transport == "disk" else 2
    assert back["live"] and back["version"] == version == want


@pytest.mark.parametrize("transport", ["disk", "gloo"])
def test_replicas_on_other_weights_wait_for_the_next_sync(fresh, transport):
    """As after a trainer crash: the replicas hold v1, a new pool (a resumed run) starts
    at v0. They answer but serve nothing until the sync the trainer makes at once."""
    other = _perturbed(fresh.model, 4)

    async def main():
        async with _pool(fresh, transport=transport) as first:
            await first.start()
            await first.update_weights(other.state_dict().items(), 1)
        async with _pool(fresh, transport=transport, sync_dir=fresh.sync_dir / "new") as pool:
            await pool.start()
            waiting = pool.needs_sync, [row["stale"] for row in status(pool)]
            with pytest.raises(EngineError, match="it rejoins at the next sync"):
                await pool.generate(_prompt(fresh.tok), Sampling(max_tokens=2))
            await pool.update_weights(fresh.model.state_dict().items(), 3)
            gen = await pool.generate(_prompt(fresh.tok), Sampling(max_tokens=4, seed=0))
            return waiting, pool.needs_sync, status(pool), gen

    waiting, after, rows, gen = asyncio.run(main())
    assert waiting == (True, [True, True]) and not after
    assert [(row["live"], row["version"]) for row in rows] == [(True, 3), (True, 3)]
    want = _forward_logprobs(fresh.model, _prompt(fresh.tok), gen.token_ids)
    assert gen.policy_version == 3
    assert torch.allclose(torch.tensor(gen.logprobs), want, atol=1e-4)


def test_replicas_sleep_and_wake_with_their_requests_kept(fresh):
    """Colocated training: between sleep() and wake() no replica decodes; a request sent
    before the sleep finishes after the wake."""

    async def main():
        async with _pool(fresh) as pool:
            await pool.start()
            with affinity(object()):
                task = asyncio.create_task(pool.generate(
                    _prompt(fresh.tok), Sampling(max_tokens=200, seed=1)))  # fmt: skip
            await asyncio.sleep(0.05)
            await pool.sleep()
            infos = [await r.client.control("GET", "/weight_info", timeout_s=10)
                     for r in pool.replicas]  # fmt: skip
            await asyncio.sleep(0.5)
            held = not task.done()
            await pool.wake()
            gen = await task
            after = [await r.client.control("GET", "/weight_info", timeout_s=10)
                     for r in pool.replicas]  # fmt: skip
            return infos, held, gen, after, status(pool)

    infos, held, gen, after, rows = asyncio.run(main())
    assert [i["asleep"] for i in infos] == [True, True] and held
    assert [i["asleep"] for i in after] == [False, False]
    assert len(gen.token_ids) > 0 and all(row["live"] for row in rows)


def test_when_every_replica_is_gone_requests_fail_at_once_naming_each(fresh):
    async def main():
        async with _pool(fresh) as pool:
            await pool.start()
            for r in fresh.replicas:
                r.kill()
            t0 = time.monotonic()
            with pytest.raises(EngineError) as err:
                with affinity(object()):
                    await pool.generate(_prompt(fresh.tok), Sampling(max_tokens=4))
            return time.monotonic() - t0, str(err.value), pool.metrics()

    took, message, metrics = asyncio.run(main())
    assert took < 10 and message.startswith("no replica can serve: replica 0 (")
    assert "replica 1 (" in message and metrics["rollout/replicas_live"] == 0
    assert metrics["rollout/replica_drops"] == 2  # tried on each, once


def test_a_pool_with_no_replica_fails_with_each_reason():
    pool = ReplicaPool([f"http://127.0.0.1:{free_port()}"], probe_s=0.2, connect_timeout_s=1)

    async def main():
        try:
            await pool.generate([1, 2, 3], Sampling(max_tokens=2))
        finally:
            await pool.close()

    with pytest.raises(EngineError, match=r"no replica can serve: replica 0 \(http.*no answer"):
        asyncio.run(main())
    with pytest.raises(ValueError, match="listed twice"):
        ReplicaPool(["http://a", "http://a"])
