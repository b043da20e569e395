"""An engine that computes shared prefixes once: the prefix-reuse path for decoder bundles.

It wraps the bundle's engine and answers ``infer`` exactly as that engine does (a score per row, or a
value per token of each row), so the batcher and everything above stay as they are. For each batch:

1. each row's ids are named in blocks (rmserve.engines.prefixes); the longest cached prefix is found,
   and the planner (``rmserve.planning.share_prefixes``) says which rows share a prefix with another
   row of the batch or with an item scored before;
2. a prefix shared within the batch is computed once (one pass of the prefix-reuse graph, starting
   from the longest part of it already cached) and kept;
3. rows with a past run in one pass of the prefix-reuse graph over their new tokens only; a row whose
   shared prefix was seen before (not in this batch) keeps that prefix from its own pass, and one that
   extends an earlier item whole keeps all of itself for the item that extends it next;
4. rows that share nothing run through the bundle's own graph, unchanged (no mask, no past).

A prefix's keys and values are the same numbers whichever row computed them (causal attention: a
token's keys depend on the tokens before it only), so a row's scores with reuse equal its scores
without it up to float rounding (fp32: within 1e-5, tests/test_prefix_reuse.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rmserve.bundle import Bundle
from rmserve.config import Settings
from rmserve.engines.base import Engine, EngineInfo, TokenBatch, left_padded_rows, pad_batch
from rmserve.engines.past import PastOutput, PastPass, PastRunner
from rmserve.engines.prefixes import BLOCK, Counter, Prefix, PrefixCache, block_hashes, default_budget_bytes
from rmserve.engines.select import call_overhead_tokens, default_batch_tokens
from rmserve.planning import MIN_SHARED_BLOCKS, RowPrefix, plan_batches, share_prefixes


@dataclass(frozen=True)
class _Row:
    ids: np.ndarray
    names: list[bytes]
    plan: RowPrefix


@dataclass(frozen=True)
class _Past:
    """Where a row's past comes from: a cached entry, its first ``tokens`` tokens."""

    entry: Prefix | None
    tokens: int


class PrefixReusingEngine:
    # The batcher takes waiting items that share at least this many leading tokens with the item it
    # plans for into the same batch (rmserve.planning.shared_group), so one pass computes the prefix.
    shared_prefix_tokens = MIN_SHARED_BLOCKS * BLOCK

    def __init__(
        self, engine: Engine, runner: PastRunner, cache: PrefixCache, pad_id: int, budget: int, overhead: int
    ) -> None:
        self.engine = engine
        self.budget, self.overhead = budget, overhead  # the batcher's: tokens per pass, price of a pass
        self.runner = runner
        self.cache = cache
        self.pad_id = pad_id
        detail = {**engine.info.detail, "prefix_reuse": {"block_tokens": BLOCK}}
        self.info: EngineInfo = replace(engine.info, detail=detail)

    def close(self) -> None:
        self.engine.close()
        self.runner.close()

    def infer(self, batch: TokenBatch) -> np.ndarray:
        if left_padded_rows(batch.attention_mask):
            return self.engine.infer(batch)  # which refuses it, naming the rows
        lengths = batch.attention_mask.sum(axis=1)
        rows = []
        for ids, n in zip(batch.input_ids, lengths, strict=True):
            rows.append((ids[: int(n)], block_hashes(ids, (int(n) - 1) // BLOCK)))
        found = [self.cache.longest(names) for _, names in rows]
        plans = share_prefixes(
            [names for _, names in rows], [f[1] if f else 0 for f in found], self.cache.seen
        )
        planned = [_Row(ids, names, plan) for (ids, names), plan in zip(rows, plans, strict=True)]
        for _, names in rows:
            self.cache.sight(names)
        self._count_lookups(planned, found)
        self._shared_in_batch(planned)
        width = batch.shape[1]
        out = np.zeros((len(planned), width) if self.runner.per_token else len(planned), np.float32)
        past_rows = [i for i, r in enumerate(planned) if r.plan.reuses or r.plan.keep_own]
        plain = [i for i in range(len(planned)) if i not in set(past_rows)]
        if plain:
            scored = self.engine.infer(pad_batch([planned[i].ids for i in plain], self.pad_id))
            for j, i in enumerate(plain):
                if self.runner.per_token:
                    out[i, : scored.shape[1]] = scored[j]
                else:
                    out[i] = scored[j]
        if past_rows:
            self._continue([planned[i] for i in past_rows], out, past_rows)
        return out

    # -- the steps -----------------------------------------------------------------------------

    def _count_lookups(self, rows: list[_Row], found: list[tuple[Prefix, int] | None]) -> None:
        hits = sum(f is not None and f[1] >= 1 and r.plan.reuses for r, f in zip(rows, found, strict=True))
        self.cache.count("hit", hits)
        self.cache.count("miss", len(rows) - hits)

    def _shared_in_batch(self, rows: list[_Row]) -> None:
        """Compute each prefix shared within the batch once, shortest first (a longer one starts from
        a shorter one computed just before), and keep it."""
        wanted = {r.names[r.plan.shared - 1]: r for r in rows if r.plan.in_batch}
        for first in sorted(wanted.values(), key=lambda r: r.plan.shared):
            names = first.names[: first.plan.shared]
            past = self._past_of(names)
            if past.tokens == len(names) * BLOCK:
                continue
            ids = first.ids[: len(names) * BLOCK]
            result = self._run([(ids, past)], presents=True)
            self._keep(result, 0, past, ids, names)

    def _past_of(self, names: list[bytes]) -> _Past:
        found = self.cache.longest(names)
        return _Past(found[0], found[1] * BLOCK) if found else _Past(None, 0)

    def _continue(self, rows: list[_Row], out: np.ndarray, where: list[int]) -> None:
        """Rows with a past, in passes over their new tokens cut as the batcher cuts batches (by
        length, by the budget and the price of a pass), so rows of like length share a pass."""
        pasts = [self._past_of(r.names[: r.plan.past]) for r in rows]
        order = sorted(range(len(rows)), key=lambda j: len(rows[j].ids) - pasts[j].tokens)
        lengths = [len(rows[j].ids) - pasts[j].tokens for j in order]
        first = 0
        for end in plan_batches(lengths, self.budget, self.overhead):
            part = order[first:end]
            self._continue_part(
                [rows[j] for j in part], [pasts[j] for j in part], out, [where[j] for j in part]
            )
            first = end
        self.cache.count("reused", sum(p.tokens for p in pasts))

    def _continue_part(self, rows: list[_Row], pasts: list[_Past], out: np.ndarray, where: list[int]) -> None:
        # What each row keeps: a prefix seen before (not shared in this batch), and all of itself when
        # it extends an earlier item whole.
        keeps = [
            [
                k
                for k in (0 if r.plan.in_batch else r.plan.shared, len(r.names) if r.plan.keep_own else 0)
                if k
            ]
            for r in rows
        ]
        result = self._run([(r.ids, p) for r, p in zip(rows, pasts, strict=True)], presents=any(keeps))
        for j, (row, past, keep) in enumerate(zip(rows, pasts, keeps, strict=True)):
            new = len(row.ids) - past.tokens
            if self.runner.per_token:
                out[where[j], : past.tokens] = _token_values(past)
                out[where[j], past.tokens : len(row.ids)] = result.output[j, :new]
            else:
                out[where[j]] = result.output[j]
            for blocks in sorted(set(keep)):
                if blocks * BLOCK > past.tokens:
                    self._keep(result, j, past, row.ids[: blocks * BLOCK], row.names[:blocks])

    def _run(self, rows: list[tuple[np.ndarray, _Past]], *, presents: bool) -> _Result:
        """One pass of the prefix-reuse graph over each row's tokens after its past."""
        width = max(p.tokens for _, p in rows)
        layers, kv = self.runner.layers, self.runner.kv_width
        keys = np.zeros((layers, len(rows), width, kv), self.runner.dtype)
        values = np.zeros_like(keys)
        past_mask = np.zeros((len(rows), width), np.int64)
        for j, (_, past) in enumerate(rows):
            if past.entry is not None:
                keys[:, j, : past.tokens] = past.entry.keys[:, : past.tokens]
                values[:, j, : past.tokens] = past.entry.values[:, : past.tokens]
                past_mask[j, : past.tokens] = 1
        new = pad_batch([ids[past.tokens :] for ids, past in rows], self.pad_id)
        step = PastPass(new.input_ids, new.attention_mask, past_mask, keys, values)
        return _Result(self.runner.run(step, presents=presents), width)

    def _keep(self, result: _Result, j: int, past: _Past, ids: np.ndarray, names: list[bytes]) -> None:
        """Keep row ``j``'s first ``len(ids)`` tokens as a cache entry."""
        assert result.output_keys is not None and result.output_values is not None
        n, width = len(ids), result.past_width
        new = n - past.tokens

        def take(present: np.ndarray) -> np.ndarray:
            row = present[:, j]
            return np.concatenate([row[:, : past.tokens], row[:, width : width + new]], axis=1)

        token_values = None
        if self.runner.per_token:
            token_values = np.concatenate([_token_values(past), result.output[j, :new]])
        self.cache.put(
            Prefix(take(result.output_keys), take(result.output_values), token_values, tuple(names))
        )


@dataclass(frozen=True)
class _Result:
    pass_output: PastOutput
    past_width: int

    @property
    def output(self) -> np.ndarray:
        return self.pass_output.output

    @property
    def output_keys(self) -> np.ndarray | None:
        return self.pass_output.keys

    @property
    def output_values(self) -> np.ndarray | None:
        return self.pass_output.values


def _token_values(past: _Past) -> np.ndarray:
    """A process graph's values at the past's tokens, as the pass that computed them gave them."""
    if past.entry is None or past.entry.token_values is None:
        return np.zeros(past.tokens, np.float32)
    return past.entry.token_values[: past.tokens]


def why_not(bundle: Bundle, info: EngineInfo, settings: Settings) -> str | None:
    """Why ``bundle`` served by an engine of ``info`` does not reuse prefixes; None when it does."""
    m = bundle.manifest
    if m.family != "decoder":
        return "an encoder attends both ways: a prefix's keys depend on the tokens after it"
    if m.extra_outputs:
        return (
            f"the prefix-reuse graph emits the score alone; this bundle's {', '.join(m.extra_outputs)} "
            "come from its full graph"
        )
    if m.past_graph is None:
        return (
            "the bundle has no prefix-reuse graph (exported before it, with a traced graph, with "
            "--no-past-graph, or with a sliding window shorter than max_length, which the graph's mask "
            "does not carry): re-export it with rmserve export where the reason allows"
        )
    if info.provider != "cpu":
        return (
            f"the prefix-reuse graph runs on ONNX Runtime's CPU provider only; this engine is "
            f"{info.provider} (serve with --provider cpu, RMSERVE_PROVIDER=cpu, to reuse prefixes)"
        )
    if info.precision != m.precision:
        return f"the prefix-reuse graph is {m.precision}; this engine runs {info.precision}"
    if not settings.prefix_reuse:
        return "switched off (RMSERVE_PREFIX_REUSE=false)"
    return None


def with_prefix_reuse(
    engine: Engine, bundle: Bundle, settings: Settings, count: Counter
) -> tuple[Engine, dict[str, Any]]:
    """``engine``, wrapped to reuse prefixes where ``why_not`` finds nothing against it, and what
    ``/v1/models`` says about it (``prefix_reuse``)."""
    reason = why_not(bundle, engine.info, settings)
    if reason is not None or bundle.manifest.past_graph is None:
        return engine, {"enabled": False, "reason": reason}
    info = engine.info
    runner = PastRunner(bundle.path / bundle.manifest.past_graph, threads=info.threads, streams=info.streams)
    budget = (settings.prefix_cache_mb << 20) if settings.prefix_cache_mb else default_budget_bytes()
    cache = PrefixCache(budget, settings.prefix_cache_ttl_s, count)
    about = {
        "enabled": True,
        "cache_bytes": budget,
        "ttl_s": settings.prefix_cache_ttl_s,
        "block_tokens": BLOCK,
    }
    budget = settings.max_batch_tokens or default_batch_tokens(info.provider)
    reusing = PrefixReusingEngine(
        engine,
        runner,
        cache,
        bundle.manifest.format.pad_token_id,
        budget,
        call_overhead_tokens(info.provider),
    )
    return reusing, about
