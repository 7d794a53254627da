"""Token-exact rendering of an episode's context through the model's chat template.

The prompt is rendered once by the chat template. After that nothing is ever re-rendered
or re-tokenised: a model turn's sampled tokens are appended as they are, and a tool result
is appended as the exact text the template (hermes) or the format (retool) inserts
between the end of a model turn that made a call and the start of the next one. That
text is found by rendering a conversation with sentinel strings in place of the model's
turn and the tool output, so any chat template that renders those contents verbatim
works, Qwen3's included.

Tokens that carry the tool's output are ``tool`` segments; the markup around them
(``<|im_end|>``, role headers, ``<tool_response>``, ``<interpreter>``) is ``template``.
Neither is trainable.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent_spo.episode.formats import ToolFormat
from agent_spo.episode.trajectory import Segment, SegmentKind

_TURN = "\u2063turn\u2063"  # invisible separators: never part of a template's own text
_OUT = "\u2063out\u2063"


class RenderError(ValueError):
    """The chat template does not render tool results in a way an episode can extend."""


class ChatRenderer:
    """Prompt ids and tool-result segments for one tokenizer, template and tool format."""

    def __init__(
        self,
        tokenizer,
        fmt: ToolFormat,
        *,
        tools: Sequence[dict] | None = None,
        system_prompt: str | None = None,
        enable_thinking: bool | None = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.tools = list(tools) if tools and fmt.name == "hermes" else None
        self.system_prompt = fmt.system_prompt if system_prompt is None else system_prompt
        self.template_kwargs = (
            {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        )
        self._pre, self._post = self._around_output()

    # ------------------------------------------------------------------ prompt
    def messages(self, problem: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": problem}]

    def render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=self.tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **self.template_kwargs,
        )

    def prompt_ids(self, problem: str) -> list[int]:
        text = self.render(self.messages(problem), add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @property
    def stop(self) -> tuple[str, ...]:
        return self.fmt.stop

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return () if eos is None else (eos,)

    # ------------------------------------------------------------------ tool results
    def _around_output(self) -> tuple[str, str]:
        """The text the template puts before and after a tool's output, after a call."""
        if self.fmt.name != "hermes":
            obs = self.fmt.observation(_OUT)
            pre, _, post = obs.partition(_OUT)
            return pre, post
        convo = [
            *self.messages("q"),
            {"role": "assistant", "content": _TURN},
            {"role": "tool", "content": _OUT},
        ]
        text = self.render(convo, add_generation_prompt=True)
        if text.count(_TURN) != 1 or text.count(_OUT) != 1 or text.index(_TURN) > text.index(_OUT):
            raise RenderError(
                "the chat template does not render assistant and tool message contents "
                "verbatim, so tool results cannot be appended token-exactly"
            )
        between = text.split(_TURN, 1)[1]
        pre, _, post = between.partition(_OUT)
        return pre, post

    def observation(self, output: str) -> list[Segment]:
        """Segments to append after a model turn that ended with a call, given its output.

        The observation text is tokenised on its own (it starts after the model's last
        token); offsets split the tokens into ``template`` and ``tool`` segments.
        """
        output = self.fmt.observation(output) if self.fmt.name == "hermes" else output
        text = self._pre + output + self._post
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        lo, hi = len(self._pre), len(self._pre) + len(output)
        segments: list[Segment] = []
        kinds_ids: list[tuple[SegmentKind, int]] = []
        for tid, (a, b) in zip(enc.input_ids, enc.offset_mapping, strict=True):
            kind: SegmentKind = "tool" if (a < hi and b > lo) else "template"
            kinds_ids.append((kind, tid))
        for kind, tid in kinds_ids:
            if segments and segments[-1].kind == kind:
                segments[-1] = Segment(kind, segments[-1].token_ids + (tid,))
            else:
                segments.append(Segment(kind, (tid,)))
        return segments
