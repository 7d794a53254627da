"""Trajectory record: construction invariants, aligned token views, JSON round trip."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_spo.episode.trajectory import (
    Segment,
    ToolCallRecord,
    Trajectory,
    TrajectoryError,
    check_extends,
)


def _example() -> Trajectory:
    return Trajectory(
        prompt_id="p1",
        prompt_token_ids=(1, 2, 3),
        segments=(
            Segment("model", (10, 11), (-0.1, -0.2), policy_version=4),
            Segment("template", (90,)),
            Segment("tool", (50, 51, 52)),
            Segment("template", (91,)),
            Segment("model", (12,), (-0.3,), policy_version=5),
        ),
        tool_calls=(
            ToolCallRecord(
                "python", {"code": "1+1"}, "2", None, "ok", 0.004, {"status": "ok", "stdout": "2\n"}
            ),
        ),
        answer="2",
        verdict="correct",
        reward=1.0,
        timings={"generate_s": 0.5},
    )


def test_token_views_are_aligned():
    t = _example()
    # response = 10 11 | 90 | 50 51 52 | 91 | 12 ; only the model tokens carry loss
    assert t.response_token_ids == (10, 11, 90, 50, 51, 52, 91, 12)
    assert t.token_ids == (1, 2, 3, 10, 11, 90, 50, 51, 52, 91, 12)
    assert t.loss_mask == (1, 1, 0, 0, 0, 0, 0, 1)
    assert t.logprobs == (-0.1, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0, -0.3)
    assert t.num_model_tokens == 3 and sum(t.loss_mask) == 3
    assert t.policy_versions == (4, 5)
    assert t.staleness(learner_version=7) == 3  # oldest segment: version 4
    # the engine's context before the last model turn = prompt + everything appended so far
    assert t.context_before(4) == (1, 2, 3, 10, 11, 90, 50, 51, 52, 91)
    assert t.context_before(0) == (1, 2, 3)


def test_json_round_trip_is_exact():
    t = _example()
    again = Trajectory.from_json(t.to_json())
    assert again == t
    assert again.to_json() == t.to_json()


@pytest.mark.parametrize("make, message", [
    (lambda: Segment("model", (1, 2), (-0.1,), 0), "2 tokens but 1 log-probs"),
    (lambda: Segment("model", (1,), None, 0), "1 tokens but None log-probs"),
    (lambda: Segment("model", (1,), (0.5,), 0), "finite and <= 0"),
    (lambda: Segment("model", (1,), (math.nan,), 0), "finite and <= 0"),
    (lambda: Segment("model", (1,), (-0.1,), None), "policy version"),
    (lambda: Segment("tool", (1,), (-0.1,)), "not sampled"),
    (lambda: Segment("template", (1,), None, 3), "not sampled"),
    (lambda: Segment("tool", ()), "empty tool segment"),
    (lambda: Segment("tool", (-1,)), "ints >= 0"),
    (lambda: Segment("thought", (1,)), "not one of"),
    (lambda: Trajectory("p", (1,), (Segment("tool", (2,)),)), "at least one model segment"),
    (lambda: Trajectory("p", (), (Segment("model", (2,), (-1.0,), 0),)), "prompt token ids"),
    (lambda: Trajectory("", (1,), (Segment("model", (2,), (-1.0,), 0),)), "prompt id"),
    (lambda: Trajectory("p", (1,), (Segment("model", (2,), (-1.0,), 0),), reward=math.inf),
     "reward must be finite"),
])  # fmt: skip
def test_invariants_raise_at_construction(make, message):
    with pytest.raises(TrajectoryError, match=message):
        make()


def test_records_are_frozen():
    t = _example()
    with pytest.raises(AttributeError):
        t.reward = 0.0
    with pytest.raises(TypeError):
        t.timings["x"] = 1.0


def test_check_extends():
    check_extends((1, 2, 3), (1, 2, 3, 4, 5))
    check_extends((1, 2), (1, 2))
    # a re-tokenisation that merged two tokens is caught, with the position
    with pytest.raises(TrajectoryError, match="first difference at token 1"):
        check_extends((1, 2, 3), (1, 23, 4))
    with pytest.raises(TrajectoryError, match="previous 3 tokens, current 2"):
        check_extends((1, 2, 3), (1, 2))


segments = st.lists(
    st.one_of(
        st.builds(
            lambda ids, v, lp: Segment("model", ids, [lp] * len(ids), v),
            st.lists(st.integers(0, 50_000), min_size=1, max_size=20),
            st.integers(0, 100),
            st.floats(-30.0, 0.0),
        ),
        st.builds(
            lambda ids: Segment("tool", ids),
            st.lists(st.integers(0, 50_000), min_size=1, max_size=20),
        ),
        st.builds(
            lambda ids: Segment("template", ids),
            st.lists(st.integers(0, 50_000), min_size=1, max_size=5),
        ),
    ),
    min_size=1,
    max_size=12,
).filter(lambda segs: any(s.kind == "model" for s in segs))


@settings(max_examples=200, deadline=None)
@given(segs=segments, prompt=st.lists(st.integers(0, 50_000), min_size=1, max_size=30))
def test_views_agree_for_any_segment_sequence(segs, prompt):
    t = Trajectory("p", prompt, segs, reward=0.0)
    n = len(t.response_token_ids)
    assert len(t.loss_mask) == len(t.logprobs) == n
    assert sum(t.loss_mask) == t.num_model_tokens
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask, strict=True) if not m)
    # every turn's context extends the previous one, ending at the full token ids
    contexts = [t.context_before(k) for k in range(len(segs) + 1)]
    for a, b in zip(contexts, contexts[1:], strict=False):
        check_extends(a, b)
    assert contexts[-1] == t.token_ids
    assert Trajectory.from_json(t.to_json()) == t
