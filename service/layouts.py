"""How a process bundle's items become token ids, and where each step's reward is read: its step layout.

One object per layout, chosen from the manifest (``ProcessSettings.layout``) at load:

* ``joint``: the item rendered as one text, as the bundle renders a (prompt, response) item, the
  response being the steps each followed by the step token (``"<extra_0>".join(steps) + "<extra_0>"``,
  the Qwen PRM model cards' convention; ``before_token`` and ``between_steps`` write Math-Shepherd's
  ``"Step 1: ... ки\nStep 2: ... ки"``); read at each step token's id. A ``{"text"}`` item carries the
  step token already. The tokenizer must read every step token as itself: where it merges a marker
  with the text beside it (Qwen2 reads ``".\\n"`` as one token) the counts differ and the item is a 422
  naming both.
* ``separate``: the prompt and each step tokenized on their own (no special tokens), the separator's ids
  appended to each step, joined by ids: the prompt's ids (with the bundle's BOS policy) first; read at
  each step's last id. This is TRL's ``PRMTrainer.tokenize_row`` (huggingface/trl
  ``trl/experimental/prm/prm_trainer.py``: ``completion + separator_ids``, BOS before the prompt when
  the tokenizer has one), PURE's "after each step we insert a token \\n", and Skywork-o1-Open-PRM's
  ``prepare_input`` (SkyworkAI/skywork-o1-prm-inference ``model_utils/io_utils.py``), so one score per
  step whatever the tokenizer merges.
* ``turns``: each step a user turn of the bundle's chat template, each answered by the assistant's
  label (RLHFlow/RLHF-Reward-Modeling ``math-rm/prm_evaluate.py``: ``user: prompt + " " + step_0``,
  ``assistant: "+"``, ``user: step_1``, ...); read at the token before each assistant label, where the
  model predicts it. Positions come from the template's own rendering, never from searching ids.

A layout that tokenizes steps one by one cannot tell where a ``{"text"}`` item's prompt ends: it takes
``{"prompt", "steps"}`` items only, and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Encoding

from rmserve.bundle import ProcessSettings
from rmserve.errors import InvalidItem
from rmserve.formatting import Formatter
from rmserve.items import Item, Message, Messages, PairItem, StepsItem, TextItem


@dataclass(frozen=True)
class Laid:
    """One item's token ids and the positions its steps are read at; a joint item keeps what rendered it
    (its pair and encoding) so a conversation can lose whole turns when it is too long."""

    ids: list[int]
    marks: list[int]
    lead: int  # leading special ids (BOS) that truncation keeps
    pair: PairItem | None = None
    enc: Encoding | None = None


class JointLayout:
    """The item as one text with the step token after each step."""

    name = "joint"

    def __init__(self, formatter: Formatter, settings: ProcessSettings) -> None:
        self.formatter = formatter
        self.settings = settings

    def lay(self, items: Sequence[Item]) -> list[Laid]:
        rendered = [self._render(i, item) for i, item in enumerate(items)]
        encs = self.formatter.tokenize([text for text, _ in rendered])
        out = []
        for i, (item, (text, pair), enc) in enumerate(zip(items, rendered, encs, strict=True)):
            marks = self.marks(enc)
            self._check(i, item, text, marks)
            out.append(Laid(list(enc.ids), marks, self.formatter.leading_special(enc), pair, enc))
        return out

    def marks(self, enc: Encoding) -> list[int]:
        return [k for k, t in enumerate(enc.ids) if t == self.settings.step_token_id]

    def _render(self, index: int, item: Item) -> tuple[str, PairItem | None]:
        if isinstance(item, TextItem):
            return item.text, None
        if not isinstance(item, StepsItem):  # the kind refuses other items before they get here
            raise InvalidItem(index, "a process reward model scores steps")
        p = self.settings
        pair = PairItem(
            item.prompt, p.between_steps.join(s + p.before_token + p.step_token for s in item.steps)
        )
        return self.formatter.text_of(index, pair), pair

    def _check(self, index: int, item: Item, text: str, marks: list[int]) -> None:
        token = self.settings.step_token
        if isinstance(item, StepsItem):
            expected = len(item.steps)
            if len(marks) != expected:
                found = f"{len(marks)} times" if marks else "nowhere"
                raise InvalidItem(
                    index,
                    f"the step token {token!r} must appear once after each of its {expected} steps and "
                    f"nowhere else; it appears {found} in the rendered item (a prompt or step may not "
                    "contain it, and the tokenizer must read it as one token)",
                )
            return
        written = text.count(token)
        if not written:
            raise InvalidItem(
                index, f"the step token {token!r} must follow each step; it appears nowhere in the text"
            )
        if len(marks) != written:
            raise InvalidItem(
                index,
                f"the text marks {written} steps with {token!r} but the tokenizer reads {len(marks)} of "
                "them as the step token (it merges a marker with the text beside it); every step must end "
                "with the step token as its own token (a bundle exported with --step-layout separate takes "
                "prompt and steps)",
            )


class SeparateLayout:
    """The prompt and each step tokenized on their own, the separator's ids after each step."""

    name = "separate"

    def __init__(self, formatter: Formatter, settings: ProcessSettings) -> None:
        self.formatter = formatter
        self.settings = settings
        self.separator = list(settings.separator_ids or (settings.step_token_id,))

    def lay(self, items: Sequence[Item]) -> list[Laid]:
        prompts = [
            prompt_text(i, item, self.name) + self.settings.prompt_suffix for i, item in enumerate(items)
        ]
        heads = self.formatter.tokenize(prompts)  # the bundle's BOS policy applies to the prompt
        steps = [s for item in items if isinstance(item, StepsItem) for s in item.steps]
        bodies = iter(self.formatter.tokenizer.encode_batch(steps, add_special_tokens=False))
        out = []
        for item, head in zip(items, heads, strict=True):
            assert isinstance(item, StepsItem)  # prompt_text refused every other item
            ids, marks = list(head.ids), []
            for _ in item.steps:
                ids += next(bodies).ids + self.separator
                marks.append(len(ids) - 1)
            out.append(Laid(ids, marks, self.formatter.leading_special(head)))
        return out


class TurnsLayout:
    """Each step a user turn of the chat template, answered by the assistant's label."""

    name = "turns"

    def __init__(self, formatter: Formatter, settings: ProcessSettings) -> None:
        if formatter.template is None:
            raise ValueError(
                "the turns step layout renders steps as chat turns: the bundle needs a chat template"
            )
        self.formatter = formatter
        self.template = formatter.template
        self.settings = settings

    def lay(self, items: Sequence[Item]) -> list[Laid]:
        texts, offsets = [], []
        for i, item in enumerate(items):
            text, at = self._render(i, item)
            texts.append(text)
            offsets.append(at)
        out = []
        for i, (enc, at) in enumerate(zip(self.formatter.tokenize(texts), offsets, strict=True)):
            marks = [self._before(i, enc, a) for a in at]
            out.append(Laid(list(enc.ids), marks, self.formatter.leading_special(enc)))
        return out

    def _render(self, index: int, item: Item) -> tuple[str, list[int]]:
        """The conversation's text and where each assistant label starts in it: the label is the last
        occurrence of the reply in the conversation rendered up to that reply (templates render a
        conversation's prefix as a prefix of its text). A conversation prompt keeps its turns, its last
        user turn taking the first step."""
        if not isinstance(item, StepsItem):
            prompt_text(index, item, self.name)  # raises: a text item
        assert isinstance(item, StepsItem)
        history, opening = _opening(item.prompt)
        reply = self.settings.step_token
        turns: list[Message] = list(history)
        at = []
        for k, step in enumerate(item.steps):
            first = opening + self.settings.prompt_suffix + step if opening else step
            turns += [Message("user", first if k == 0 else step), Message("assistant", reply)]
            try:
                text = self.template.render(tuple(turns))
            except Exception as exc:  # a template's own raise_exception, or a Jinja error
                raise InvalidItem(index, f"chat template rejected the steps as turns: {exc}") from None
            at.append(text.rindex(reply))
        return text, at

    def _before(self, index: int, enc: Encoding, char: int) -> int:
        """The position before the token the label starts at, which must be the label's own token."""
        k = next((k for k, (a, b) in enumerate(enc.offsets) if a <= char < b and k > 0), None)
        if k is None or enc.ids[k] != self.settings.step_token_id or enc.offsets[k][0] != char:
            raise InvalidItem(
                index,
                f"the assistant's label {self.settings.step_token!r} is not one token where the template "
                "writes it; the steps cannot be read",
            )
        return k - 1


StepLayoutObject = JointLayout | SeparateLayout | TurnsLayout


def _opening(prompt: str | Messages) -> tuple[Messages, str]:
    """(the turns before the first step's, the text the first step's user turn opens with)."""
    if isinstance(prompt, str):
        return (), prompt
    if prompt and prompt[-1].role == "user":
        return tuple(prompt[:-1]), prompt[-1].text
    return tuple(prompt), ""


def prompt_text(index: int, item: Item, layout: str) -> str:
    """A steps item's prompt as text, for layouts that tokenize the prompt and steps apart."""
    if not isinstance(item, StepsItem):
        raise InvalidItem(
            index,
            f"this model reads each step on its own (step layout {layout}): send prompt and steps, not text",
        )
    if not isinstance(item.prompt, str):
        raise InvalidItem(
            index,
            f"this model reads the prompt as plain text (step layout {layout}): send the prompt as a string",
        )
    return item.prompt


def layout_of(formatter: Formatter, settings: ProcessSettings) -> StepLayoutObject:
    """The layout object a process bundle's manifest names."""
    if settings.layout == "separate":
        return SeparateLayout(formatter, settings)
    if settings.layout == "turns":
        return TurnsLayout(formatter, settings)
    return JointLayout(formatter, settings)
