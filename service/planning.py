"""Batch planning: how a length-sorted window of waiting items is cut into forward passes, and which
rows of a batch share a prefix.

Pure functions of the items' lengths, the token budget and the price of a forward pass; the batcher
(``rmserve.batching``) calls them on every plan. ``share_prefixes`` is a function of the rows' block
hashes and what the prefix cache holds; the prefix-reusing engine (rmserve.engines.reuse) calls it on
every batch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


# A group of items sharing a prefix may take this many batch budgets in one forward pass: split across
# streams it would compute its prefix once per stream, so it is cheaper whole.
SHARED_GROUP_BUDGETS = 4


def shared_group(
    first: Sequence[int], others: Sequence[Sequence[int]], min_tokens: int, budget: int
) -> list[int]:
    """The positions of ``others`` that share at least ``min_tokens`` leading token ids with ``first``,
    as many as fit ``SHARED_GROUP_BUDGETS * budget`` computed tokens (the shortest shared prefix
    once, then each item's tokens after it), in order."""
    head = tuple(first[:min_tokens])
    if len(head) < min_tokens:
        return []
    chosen: list[int] = []
    shared = len(first) - 1
    cost = len(first)
    for i, ids in enumerate(others):
        if tuple(ids[:min_tokens]) != head:
            continue
        common = next(
            (k for k, (a, b) in enumerate(zip(first, ids, strict=False)) if a != b), min(len(first), len(ids))
        )
        new_shared = min(shared, common)
        # Every member's tokens after the (possibly shorter) shared prefix, plus the prefix once.
        new_cost = cost + (len(ids) - new_shared) + (shared - new_shared) * (len(chosen) + 1)
        if new_cost > SHARED_GROUP_BUDGETS * budget:
            break
        chosen.append(i)
        shared, cost = new_shared, new_cost
    return chosen


# A prefix shorter than this many blocks is recomputed: a pass over a past costs an explicit mask and
# a copy of the past, which a short prefix does not repay.
MIN_SHARED_BLOCKS = 2


@dataclass(frozen=True)
class RowPrefix:
    """What one row of a batch reuses, in blocks of ``rmserve.engines.prefixes.BLOCK`` tokens."""

    cached: int  # found in the prefix cache: the past it can start from
    shared: int  # shared with another row of this batch or an item seen before (0: none worth it)
    in_batch: bool  # ``shared`` is shared within this batch: one pass computes it for all its rows
    keep_own: bool  # it extends an earlier item whole (step-by-step scoring): keep its own blocks

    @property
    def past(self) -> int:
        """The blocks it starts from once the shared prefix exists."""
        return max(self.cached, self.shared)

    @property
    def reuses(self) -> bool:
        return self.past >= MIN_SHARED_BLOCKS


def share_prefixes(
    names: Sequence[Sequence[bytes]], cached: Sequence[int], seen: Callable[[bytes], int | None]
) -> list[RowPrefix]:
    """Which rows share which prefix. ``names``: each row's block hashes (one per whole block, the
    last token always left out, so every row has a token to compute); ``cached``: the blocks of each
    row found in the prefix cache; ``seen``: for a block hash of an earlier item, how many blocks
    before that item's last it lay (None if none had it)."""
    counts = Counter(name for row in names for name in set(row))
    plans = []
    for row, found in zip(names, cached, strict=True):
        in_batch = next((k for k in range(len(row), 0, -1) if counts[row[k - 1]] > 1), 0)
        before, distance = 0, None
        for k in range(len(row), max(found, 1) - 1, -1):  # down to the cached prefix's own end
            distance = seen(row[k - 1])
            if distance is not None:
                before = k
                break
        shared = max(in_batch, before)
        if shared < MIN_SHARED_BLOCKS or shared <= found:
            shared = 0
        grows = before > 0 and distance is not None and distance <= 1
        plans.append(RowPrefix(found, shared, shared > 0 and shared == in_batch, grows))
    return plans
