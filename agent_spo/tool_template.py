"""The files `agent-spo tools new NAME` writes: a working, commented tool and its test."""

TEMPLATE = '''\
"""NAME: a tool the model can call (written by `agent-spo tools new NAME`).

A tool is a typed Python function whose docstring is written for the model: @tool turns
the summary and the Args section into the function-calling schema the model receives
(see it with `agent-spo tools show NAME.py`). Arguments are checked against that schema
before the function runs; a bad call goes back to the model as a message.

The function runs inside the sandbox, never in the trainer: with a time and memory
limit per call, no network, a read-only view of this file (nothing else of its
directory) and only a scratch directory to write. The trainer only imports this file to
read the schema, so keep import-time work light. Anything it imports must be installed
in the Python environment the trainer uses (the sandbox runs the same one).

What the model sees is the returned string (numbers, lists and dicts come out as JSON).
An exception becomes "ExceptionType: message" for the model: raise with a message that
helps it call again. Offer the tool with rollout.tools=[python,NAME.py].
"""

from tools.sdk import tool

DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@tool
def NAME(n: int, base: int = 10) -> str:
    """Write a non-negative integer in a base from 2 to 36 and sum its digits.

    Args:
        n: The integer, e.g. 2024.
        base: The base to write it in, from 2 to 36 (default 10).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 2 <= base <= 36:
        raise ValueError(f"base must be between 2 and 36, got {base}")
    digits = []
    while True:
        n, d = divmod(n, base)
        digits.append(d)
        if n == 0:
            break
    digits.reverse()
    written = "".join(DIGITS[d] for d in digits)
    return f"{written} in base {base}; digit sum {sum(digits)}"
'''

TEST_TEMPLATE = '''\
"""Tests for NAME.py: run them with `pytest test_NAME.py`."""

import pathlib

import pytest

from agent_spo.testing import call_tool

HERE = pathlib.Path(__file__).parent
TOOL = str(HERE / "NAME.py")


def test_it_answers():
    from NAME import NAME

    assert NAME(n=2024, base=7) == "5621 in base 7; digit sum 14"
    assert NAME(n=0) == "0 in base 10; digit sum 0"
    with pytest.raises(ValueError, match="base"):
        NAME(n=5, base=1)


def test_the_model_sees_its_answer_from_the_sandbox():
    call = call_tool(TOOL, {"n": 255, "base": 16})
    assert call.fault is None and call.observation == "ff in base 16; digit sum 30"


def test_a_bad_call_is_explained_to_the_model():
    call = call_tool(TOOL, {"n": "many"})
    assert call.fault == "model" and "must be an integer" in call.observation
    call = call_tool(TOOL, {"n": 5, "base": 99})
    assert call.fault == "tool" and "base must be between 2 and 36" in call.observation
'''

DEMO_TEMPLATE = """\
# The tool demo for NAME.py (written by `agent-spo tools new NAME`): a CPU training run
# whose tasks need the tool ("the sum of the digits of N written in base B").
#   agent-spo train NAME_demo.yaml
# model.demo_tool first teaches the tiny demo model to call NAME (a short warm start
# whose demonstrations call it with n and base, and otherwise guess; cached); then SPO
# trains it, and the held-out accuracy rises as it learns to call the tool instead of
# guessing. Every other setting is the plain demo's (configs/demo.yaml).
# Paths are relative to the directory you run from.

run:
  name: NAME-demo

model:
  path: null
  demo_tool: NAME.py

data:
  train: synthetic:base_digits

rollout:
  tools: [python, NAME.py]

train:
  total_steps: 40
  eval_every: 10
"""
