"""How well a demo model copies numbers: a teacher-forced probe on solved demonstrations.

For each task, the solved demonstration (code that computes the answer, the real tool
output, then ``\\boxed{answer}``) is rendered exactly as an episode would be, and one
forward pass predicts every next token. A task counts as copied right in its code when
the arg-max prediction is right for every number token of the tool calls (operands copied
from the problem), and in its answer when it is right for every number token of the final
turn (the result copied from the tool output). The decision to use the tool is given, so
this isolates the copying the policy needs once it has learned to call the tool.

`agent-spo demo-model --probe` prints it; the README quotes it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from agent_spo.data.problems import Problem
from agent_spo.demo.demonstrations import answer_text, call_text, solution_steps


@dataclass
class ProbeResult:
    # family:level -> [tasks whose code copied right, whose answer did, tasks]
    by_kind: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))

    def _total(self, column: int) -> int:
        return sum(row[column] for row in self.by_kind.values())

    @property
    def tasks(self) -> int:
        return self._total(2)

    @property
    def code(self) -> float:
        return self._total(0) / self.tasks if self.tasks else 0.0

    @property
    def answer(self) -> float:
        return self._total(1) / self.tasks if self.tasks else 0.0

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "code": round(self.code, 4),
            "answer": round(self.answer, 4),
            "by_kind": {
                k: dict(zip(("code", "answer", "tasks"), v, strict=True))
                for k, v in sorted(self.by_kind.items())
            },  # fmt: skip
        }


def copy_probe(model, renderer, problems: list[Problem]) -> ProbeResult:
    """Teacher-forced copying accuracy of ``model`` (anything called as
    ``model(input_ids=...)`` returning ``.logits``) on the solved demonstrations of
    ``problems``, rendered with ``renderer`` (a demo renderer, see ``renderer_for``)."""
    import torch

    from agent_spo.demo.build import _encode, number_token_ids

    numbers = number_token_ids(renderer.tokenizer)
    fmt = renderer.fmt.name
    out = ProbeResult()
    for p in problems:
        turns = [(call_text(fmt, code), shown) for code, shown in solution_steps(p)]
        ids, mask = _encode(renderer, p, [*turns, (answer_text(p.answer), None)])
        with torch.no_grad():
            pred = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        # the final turn is the last run of trainable tokens
        last = max(i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1]))
        code_ok = answer_ok = True
        for i in range(1, len(ids)):
            if mask[i] and ids[i] in numbers and pred[i - 1] != ids[i]:
                if i >= last:
                    answer_ok = False
                else:
                    code_ok = False
        kind = p.source.split(":", 1)[1] if ":" in p.source else p.source
        row = out.by_kind[kind]
        row[0] += code_ok
        row[1] += answer_ok
        row[2] += 1
    return out


def probe_model_dir(path, n: int) -> ProbeResult:
    """:func:`copy_probe` of the demo model saved at ``path`` on ``n`` demo tasks (hermes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_spo.data.synthetic import make_tasks
    from agent_spo.demo.build import renderer_for

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return copy_probe(model, renderer_for(tok, "hermes"), make_tasks(n, seed=0))
