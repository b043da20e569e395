"""A process bundle's items -> token ids: each step followed by the step token, and where those tokens are.

A ``StepsItem`` is rendered as the bundle renders (prompt, response) items, the response being its steps,
each followed by the step token (``"<extra_0>".join(steps) + "<extra_0>"``, the Qwen PRM model cards'
convention), so a conversation prompt goes through the bundle's chat template (``rmserve.chat``) like any
other; a ``TextItem`` must already carry the step token after each step. The step token must appear
exactly once per step: a prompt or step that contains it is a 422.

What follows the last step token (the template's end of turn) is not scored: a decoder's value at a
step's token cannot depend on later tokens. An item over ``max_length`` whose prompt is a conversation
first loses its oldest whole turns, as outcome items do (``Formatter.fewer_turns``: a leading system
message and the latest prompt turn stay); one still over loses its oldest tokens before the first step
token (a leading BOS stays): the prompt's, and once the prompt is gone the first step's text. If the
remaining steps still reach past the limit, ``auto`` keeps the leading steps that fit whole and reports
how many were dropped (``Encoded.dropped``); ``strict`` (truncation ``error``) answers 413 for any item
over the limit, as it does for outcome items.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Encoding

from rmserve.bundle import ProcessSettings
from rmserve.errors import InvalidItem, ItemTooLong
from rmserve.formatting import Encoded, Formatter
from rmserve.items import Item, PairItem, StepsItem, TextItem


class StepEncoder:
    """Turns the items of a process bundle into token ids with their step positions."""

    def __init__(self, formatter: Formatter, settings: ProcessSettings) -> None:
        self.formatter = formatter
        self.settings = settings

    def encode(
        self, items: Sequence[Item], *, strict: bool = False, positions: list[int] | None = None
    ) -> list[Encoded]:
        """Token ids and step positions of each item, in order (see the module docstring).

        ``positions`` are the items' indices in the caller's request, used to name an item in errors.
        """
        try:
            rendered = [self._render(i, item) for i, item in enumerate(items)]
            encs = self.formatter.tokenize([t for t, _ in rendered])
            fits = enumerate(zip(items, rendered, encs, strict=True))
            return [self._fit(i, item, pair, enc, strict) for i, (item, (_, pair), enc) in fits]
        except (InvalidItem, ItemTooLong) as exc:
            if positions is not None:
                raise exc.at(positions[exc.index]) from None
            raise

    def _render(self, index: int, item: Item) -> tuple[str, PairItem | None]:
        """The item's text, and for a steps item the (prompt, response) item it was rendered as: the
        response is its steps, each followed by the step token. Text carries its step tokens already."""
        if isinstance(item, TextItem):
            return item.text, None
        if not isinstance(item, StepsItem):  # the kind refuses other items before they get here
            raise InvalidItem(index, "a process reward model scores steps")
        # The same chat template (or plain concatenation) as every other item of the bundle renders it.
        pair = PairItem(item.prompt, "".join(s + self.settings.step_token for s in item.steps))
        return self.formatter.text_of(index, pair), pair

    def _marks(self, enc: Encoding) -> list[int]:
        return [k for k, t in enumerate(enc.ids) if t == self.settings.step_token_id]

    def _scored_length(self, enc: Encoding) -> int:
        """The tokens that count against max_length: up to the last step token."""
        marks = self._marks(enc)
        return marks[-1] + 1 if marks else len(enc.ids)

    def _fit(self, index: int, item: Item, pair: PairItem | None, enc: Encoding, strict: bool) -> Encoded:
        marks = self._marks(enc)
        expected = len(item.steps) if isinstance(item, StepsItem) else None
        if not marks or (expected is not None and len(marks) != expected):
            found = f"{len(marks)} times" if marks else "nowhere"
            what = f"once after each of its {expected} steps" if expected else "after each step"
            raise InvalidItem(
                index,
                f"the step token {self.settings.step_token!r} must appear {what} and nowhere else; it "
                f"appears {found} in the rendered item (a prompt or step may not contain it)",
            )
        limit = self.formatter.settings.max_length
        if marks[-1] < limit:  # nothing after the last step token changes a step's value
            return Encoded(tuple(enc.ids[: marks[-1] + 1]), None, False, tuple(marks))
        if strict:
            raise ItemTooLong(index, marks[-1] + 1, limit)
        if pair is not None:  # a conversation loses its oldest whole turns first, as outcome items do
            enc = self.formatter.fewer_turns(pair, enc, self._scored_length)
            marks = self._marks(enc)
        ids = list(enc.ids[: marks[-1] + 1])
        lead = self.formatter.leading_special(enc)
        cut = max(0, min(len(ids) - limit, marks[0] - lead))  # the oldest tokens before the first step token
        ids = ids[:lead] + ids[lead + cut :]
        marks = [m - cut for m in marks]
        kept = [m for m in marks if m < limit]  # the first always fits: it sits right after the lead
        return Encoded(tuple(ids[: kept[-1] + 1]), None, True, tuple(kept), len(marks) - len(kept))
