"""A process bundle's items -> token ids: each step followed by the step token, and where those tokens are.

A ``StepsItem`` is rendered as the bundle renders (prompt, response) items, the response being its steps,
each followed by the step token (``"<extra_0>".join(steps) + "<extra_0>"``, the Qwen PRM model cards'
convention); a ``TextItem`` must already carry the step token after each step. The step token must
appear exactly once per step: a prompt or step that contains it is a 422.

What follows the last step token (the template's end of turn) is not scored: a decoder's value at a
step's token cannot depend on later tokens. An item still over ``max_length`` loses its oldest tokens
before the first step token (a leading BOS stays): the prompt's, and once the prompt is gone the first
step's text. If the remaining steps still reach past the limit, ``auto`` keeps the leading steps that
fit whole and reports how many were dropped (``Encoded.dropped``); ``strict`` (truncation ``error``)
answers 413 for any item over the limit, as it does for outcome items.
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
            texts = [self._text(i, item) for i, item in enumerate(items)]
            add = self.formatter.settings.add_special_tokens
            encs = self.formatter.tokenizer.encode_batch(texts, add_special_tokens=add)
            return [
                self._fit(i, item, enc, strict) for i, (item, enc) in enumerate(zip(items, encs, strict=True))
            ]
        except (InvalidItem, ItemTooLong) as exc:
            if positions is not None:
                raise exc.at(positions[exc.index]) from None
            raise

    def _text(self, index: int, item: Item) -> str:
        token = self.settings.step_token
        if isinstance(item, TextItem):
            return item.text
        if not isinstance(item, StepsItem):  # the kind refuses other items before they get here
            raise InvalidItem(index, "a process reward model scores steps")
        # The formatter renders the steps as the response of a (prompt, response) item: the same
        # chat template, or the same plain concatenation, as every other item of the bundle.
        return self.formatter.text_of(index, PairItem(item.prompt, "".join(s + token for s in item.steps)))

    def _fit(self, index: int, item: Item, enc: Encoding, strict: bool) -> Encoded:
        token, token_id = self.settings.step_token, self.settings.step_token_id
        ids = list(enc.ids)
        marks = [k for k, t in enumerate(ids) if t == token_id]
        expected = len(item.steps) if isinstance(item, StepsItem) else None
        if not marks or (expected is not None and len(marks) != expected):
            found = f"{len(marks)} times" if marks else "nowhere"
            what = f"once after each of its {expected} steps" if expected else "after each step"
            raise InvalidItem(
                index,
                f"the step token {token!r} must appear {what} and nowhere else; it appears {found} "
                "in the rendered item (a prompt or step may not contain it)",
            )
        ids = ids[: marks[-1] + 1]  # nothing after the last step token changes a step's value
        limit = self.formatter.settings.max_length
        if len(ids) <= limit:
            return Encoded(tuple(ids), None, False, tuple(marks))
        if strict:
            raise ItemTooLong(index, len(ids), limit)
        lead = self.formatter.leading_special(enc)
        cut = min(len(ids) - limit, marks[0] - lead)  # the oldest tokens before the first step token
        ids = ids[:lead] + ids[lead + cut :]
        marks = [m - cut for m in marks]
        kept = [m for m in marks if m < limit]  # the first always fits: it sits right after the lead
        return Encoded(tuple(ids[: kept[-1] + 1]), None, True, tuple(kept), len(marks) - len(kept))
