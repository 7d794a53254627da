"""The reference recipe's extra reward conditions for thinking models (spec §6).

With Qwen3's thinking mode the model reasons inside ``<think> ... </think>`` and then
answers. The reference reward gives 0, whatever the answer, to a response that does not
close its thinking exactly once, or that calls a tool after closing it. Both are options
(``reward.one_think_close``, ``reward.no_tool_call_after_think``), on in the paper's
configs. They look at the model's own turns only, with special tokens kept (Qwen3's
``</think>`` is one), never at tool output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class RewardRules:
    one_think_close: bool = False
    no_tool_call_after_think: bool = False

    @property
    def active(self) -> bool:
        return self.one_think_close or self.no_tool_call_after_think

    def violation(self, turns: Sequence[str], parse: Callable) -> str | None:
        """Why the response breaks a rule (naming its key), or None. ``turns``: the text
        of each model turn in order; ``parse``: the tool format's call parser."""
        closes = 0
        for text in turns:
            call = parse(text) if self.no_tool_call_after_think else None
            if call is not None:
                at = text.find(call.raw)
                if closes or THINK_CLOSE in text[: max(at, 0)]:
                    return "reward.no_tool_call_after_think: a tool call after </think>"
            closes += text.count(THINK_CLOSE)
        if self.one_think_close and closes != 1:
            return f"reward.one_think_close: {closes} </think> tags, exactly one is required"
        return None


def apply_rules(verdict, rules: RewardRules, turns: Sequence[str], parse: Callable):
    """``verdict``, turned incorrect (reward 0, the rule named in its reason) when a correct
    response breaks an active rule; any other verdict as it is."""
    if not rules.active or not verdict.correct:
        return verdict
    why = rules.violation(turns, parse)
    if why is None:
        return verdict
    from dataclasses import replace

    return replace(verdict, correct=False, status="incorrect", reason=why)
