"""A process bundle's items -> token ids and where each step's reward is read, fitted to max_length.

The bundle's step layout (``rmserve.layouts``: joint, separate or turns) says how an item becomes ids and
where its steps are read; the number of positions always equals the number of steps sent (a layout that
cannot find one per step answers 422 naming the counts).

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
from rmserve.items import Item
from rmserve.layouts import JointLayout, Laid, layout_of


class StepEncoder:
    """Turns the items of a process bundle into token ids with their step positions, by the bundle's
    step layout (``rmserve.layouts``), and fits them to max_length."""

    def __init__(self, formatter: Formatter, settings: ProcessSettings) -> None:
        self.formatter = formatter
        self.settings = settings
        self.layout = layout_of(formatter, settings)

    def encode(
        self, items: Sequence[Item], *, strict: bool = False, positions: list[int] | None = None
    ) -> list[Encoded]:
        """Token ids and step positions of each item, in order (see the module docstring).

        ``positions`` are the items' indices in the caller's request, used to name an item in errors.
        """
        try:
            laid = self.layout.lay(items)
            return [self._fit(i, one, strict) for i, one in enumerate(laid)]
        except (InvalidItem, ItemTooLong) as exc:
            if positions is not None:
                raise exc.at(positions[exc.index]) from None
            raise

    def _fit(self, index: int, laid: Laid, strict: bool) -> Encoded:
        ids, marks = laid.ids, laid.marks
        limit = self.formatter.settings.max_length
        if marks[-1] < limit:  # nothing after the last step's position changes a step's value
            return Encoded(tuple(ids[: marks[-1] + 1]), None, False, tuple(marks))
        if strict:
            raise ItemTooLong(index, marks[-1] + 1, limit)
        lead = laid.lead
        if laid.pair is not None and laid.enc is not None and isinstance(self.layout, JointLayout):
            # A conversation loses its oldest whole turns first, as outcome items do.
            marker = self.layout
            enc = self.formatter.fewer_turns(laid.pair, laid.enc, lambda e: _scored(marker.marks(e), e))
            ids, marks = list(enc.ids), marker.marks(enc)
            lead = self.formatter.leading_special(enc)
        ids = ids[: marks[-1] + 1]
        cut = max(0, min(len(ids) - limit, marks[0] - lead))  # the oldest tokens before the first step ends
        ids = ids[:lead] + ids[lead + cut :]
        marks = [m - cut for m in marks]
        kept = [m for m in marks if m < limit]  # the first always fits: it sits right after the lead
        return Encoded(tuple(ids[: kept[-1] + 1]), None, True, tuple(kept), len(marks) - len(kept))


def _scored(marks: list[int], enc: Encoding) -> int:
    """The tokens that count against max_length: up to the last step token."""
    return marks[-1] + 1 if marks else len(enc.ids)
