"""The drift d_s measured on a probe of the batch: the update is unchanged, the no-grad
passes shrink to the probe, and the probe's d_s tracks the whole batch's."""

from __future__ import annotations

import copy

import torch
from test_learner import _model, _trajectories, tok  # noqa: F401 - tok is a fixture

from agent_spo.learner import Learner

ADV = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.5, -1.5, 0.25, -0.25, 1.0, -1.0]


def _counting(learner: Learner) -> list[int]:
    """Rows of every no-grad log-prob pass the learner runs, recorded as it runs them."""
    rows: list[int] = []
    plain = learner.token_logprobs

    def counted(trajs):
        rows.append(len(trajs))
        return plain(trajs)

    learner.token_logprobs = counted  # type: ignore[method-assign]
    return rows


def test_probe_changes_the_drift_measurement_not_the_update(tok):  # noqa: F811
    base = _model(tok, torch.float64)
    full = Learner(copy.deepcopy(base), lr=1e-2, mini_batches=2)
    probed = Learner(copy.deepcopy(base), lr=1e-2, mini_batches=2, probe_tokens=30)
    trajs = _trajectories(full, 12, len(tok), seed=7)
    rows_full, rows_probe = _counting(full), _counting(probed)
    a, b = full.step(trajs, ADV), probed.step(trajs, ADV)
    for pa, pb in zip(full.model.parameters(), probed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)  # the same update
    assert a.loss == b.loss and a.clip_frac == b.clip_frac
    assert rows_full == [12, 12]  # before and after, over the whole batch
    chosen = probed._probe(trajs)  # the version has moved on: not this step's probe
    assert len(rows_probe) == 2 and rows_probe[0] == rows_probe[1] < 12
    assert 0 < b.drift and abs(b.drift - a.drift) < 0.5 * a.drift  # the same quantity
    assert chosen != list(range(12))


def test_probe_holds_whole_trajectories_up_to_the_token_budget(tok):  # noqa: F811
    learner = Learner(_model(tok), probe_tokens=25)
    trajs = _trajectories(learner, 12, len(tok), seed=7)
    counts = [sum(t.loss_mask) for t in trajs]
    probe = learner._probe(trajs)
    held = sum(counts[i] for i in probe)
    # at the budget, and one trajectory fewer (the last one drawn, at most the largest)
    # would have been under it
    assert held >= 25 and held - max(counts[i] for i in probe) < 25 and len(probe) < 12
    learner.version += 1
    assert learner._probe(trajs) != probe  # a new draw each version (seeded by it)
    learner.version -= 1
    assert learner._probe(trajs) == probe  # and reproducible


def test_a_probe_larger_than_the_batch_is_the_whole_batch(tok):  # noqa: F811
    base = _model(tok, torch.float64)
    full = Learner(copy.deepcopy(base), lr=1e-2)
    probed = Learner(copy.deepcopy(base), lr=1e-2, probe_tokens=10**6)
    trajs = _trajectories(full, 6, len(tok), seed=9)
    assert full.step(trajs, ADV[:6]).drift == probed.step(trajs, ADV[:6]).drift


def test_recompute_mode_reuses_its_full_before_pass(tok):  # noqa: F811
    learner = Learner(_model(tok), lr=1e-2, logp_old="recompute", probe_tokens=30)
    trajs = _trajectories(learner, 12, len(tok), seed=7)
    rows = _counting(learner)
    learner.step(trajs, ADV)
    assert rows[0] == 12 and rows[1] < 12  # the full "before" serves logp_old and the probe
