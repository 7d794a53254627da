"""Checkpoints round-trip exactly and survive a crash mid-write."""

from __future__ import annotations

import pytest
import torch

from agent_spo.algo import PrioritizedSampler, ValueTracker
from agent_spo.checkpoint import latest_checkpoint, restore, save_checkpoint
from agent_spo.learner import Learner


@pytest.fixture()
def parts():
    from agent_spo.demo.model import random_model
    from agent_spo.demo.tokenizer import train_tokenizer

    tok = train_tokenizer([f"{i} plus {i} is {2 * i}" for i in range(200)], vocab_size=300)
    learner = Learner(random_model(tok, hidden=32, layers=1, heads=2), lr=1e-3)
    model, opt = learner.model, learner.opt
    loss = model(torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss
    loss.backward()
    opt.step()  # the optimizer now has moments to save
    keys = [f"k{i}" for i in range(10)]
    tracker = ValueTracker()
    sampler = PrioritizedSampler(keys, v_hat=[0.5] * 10, n_eff=[2.0] * 10, seed=3)
    for i in range(5):
        tracker.record_step_drift(0.01 * i)
        k = sampler.draw()
        tracker.observe(k, float(i % 2))
        sampler.release(k)
        sampler.refresh(k, tracker.value(k), tracker.n_eff(k))
    return tok, learner, tracker, sampler, keys


def test_round_trip_restores_every_state_exactly(tmp_path, parts):
    from transformers import AutoModelForCausalLM

    from agent_spo.demo.model import random_model

    tok, learner, tracker, sampler, keys = parts
    model, opt = learner.model, learner.opt
    path = save_checkpoint(tmp_path, step=7, learner=learner, tokenizer=tok,
                           tracker=tracker, sampler=sampler, learner_version=7,
                           episode_log_offset=1234)  # fmt: skip
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.path == path and ckpt.step == 7
    assert ckpt.state["episode_log_offset"] == 1234 and ckpt.state["learner_version"] == 7

    assert ckpt.sharded and ckpt.has_weights  # one process: a loadable model directory too
    exported = AutoModelForCausalLM.from_pretrained(str(ckpt.model_dir))
    learner2 = Learner(random_model(tok, seed=5, hidden=32, layers=1, heads=2), lr=1e-3)
    model2, opt2 = learner2.model, learner2.opt
    tracker2 = ValueTracker()
    sampler2 = PrioritizedSampler(keys, v_hat=[0.5] * 10, n_eff=[2.0] * 10, seed=99)
    restore(ckpt, learner=learner2, tracker=tracker2, sampler=sampler2)
    for a, b, c in zip(model.state_dict().values(), model2.state_dict().values(),
                       exported.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b) and torch.equal(a, c)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert tracker2.state_dict() == tracker.state_dict()
    # the sampler continues with the same draws (its RNG was saved)
    assert [sampler2.draw() for _ in range(5)] == [sampler.draw() for _ in range(5)]


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, parts, monkeypatch):
    tok, learner, tracker, sampler, _ = parts
    kw = dict(learner=learner, tokenizer=tok, tracker=tracker, sampler=sampler)
    save_checkpoint(tmp_path, step=1, learner_version=1, **kw)

    def crash(*a, **k):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(learner.model, "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, step=2, learner_version=2, **kw)
    assert list(tmp_path.glob(".tmp-*"))  # the torn write is there ...
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 1  # ... and ignored
    monkeypatch.undo()
    save_checkpoint(tmp_path, step=3, learner_version=3, **kw)
    assert not list(tmp_path.glob(".tmp-*"))  # cleaned on the next save
    assert latest_checkpoint(tmp_path).step == 3


def test_only_the_newest_are_kept(tmp_path, parts):
    tok, learner, tracker, sampler, _ = parts
    kw = dict(learner=learner, tokenizer=None, tracker=tracker, sampler=sampler)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step=step, learner_version=step, keep=2, **kw)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000003", "ckpt-000004"]
    assert latest_checkpoint(tmp_path).step == 4
    assert latest_checkpoint(tmp_path / "nothing-here") is None
