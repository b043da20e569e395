"""Batch planning: how a length-sorted window of waiting items is cut into forward passes.

Pure functions of the items' lengths, the token budget and the price of a forward pass; the batcher
(``rmserve.batching``) calls them on every plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Up to this many waiting items are planned exactly; a longer queue is cut greedily by the budget
# (its sorted lengths lie so close together that the greedy cut pads almost nothing).
PLAN_EXACT_ITEMS = 64


def plan_batches(lengths: Sequence[int], budget: int, overhead: int) -> list[int]:
    """The cheapest way to cut ascending ``lengths`` into consecutive batches; returns their ends.

    A batch of ``rows`` items whose longest has ``width`` tokens costs ``overhead + rows * width``:
    the padded tokens it computes plus the fixed price of one forward pass, in tokens. No batch's
    padded size exceeds ``budget`` (an item longer than the budget runs alone).
    """
    n = len(lengths)
    cost = [0.0] + [math.inf] * n
    start = [0] * (n + 1)
    for end in range(1, n + 1):
        width = lengths[end - 1]
        max_rows = max(1, budget // max(width, 1))
        for first in range(end - 1, max(0, end - max_rows) - 1, -1):
            c = cost[first] + overhead + (end - first) * width
            if c < cost[end]:
                cost[end], start[end] = c, first
    ends: list[int] = []
    end = n
    while end > 0:
        ends.append(end)
        end = start[end]
    return ends[::-1]


def greedy_batches(lengths: Sequence[int], budget: int) -> list[int]:
    """Ends of the batches that fill ``budget`` one after another over ascending ``lengths``."""
    ends: list[int] = []
    first = 0
    for i, width in enumerate(lengths):
        # Ascending, so this item's length is the padded width of the batch it joins.
        if i > first and (i + 1 - first) * width > budget:
            ends.append(i)
            first = i
    if lengths:
        ends.append(len(lengths))
    return ends


def batch_holding(lengths: Sequence[int], index: int, budget: int, overhead: int) -> range:
    """The positions of the planned batch that holds ``index`` in ascending ``lengths``: planned
    exactly up to ``PLAN_EXACT_ITEMS`` items, greedily past that."""
    exact = len(lengths) <= PLAN_EXACT_ITEMS
    ends = plan_batches(lengths, budget, overhead) if exact else greedy_batches(lengths, budget)
    first = 0
    for end in ends:
        if index < end:
            return range(first, end)
        first = end
    raise IndexError(f"position {index} is past the {len(lengths)} planned items")
