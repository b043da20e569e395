"""The workload GRPO trainers send a reward model, and the ways it is scored (loadtests/gpu_check.py).

GRPO scores ``group`` responses to each prompt. Prompt and response lengths are drawn log-uniform
(prompts 32-1,024 tokens, responses 64-3,072 by default), seeded, and a response is cut so that the
item fits the bundle's ``max_length``; items arrive prompt by prompt, a group's responses together.
Token ids are random (the model is random-init too): speed, not scores, is measured here.

Ways of scoring the same items, each reported as pairs/s and padded-token fraction (positions a
forward pass computes for padding over all positions it computes):

* rmserve's batcher with 1-item requests from 64 callers, and with one ``group``-item request per
  prompt from 8 callers (64 items in flight either way): the batcher sorts what waits by length
  and cuts it into batches by padded-token cost;
* HF + SDPA in fixed micro-batches of 32 in arrival order, right-padded with an attention mask:
  what OpenRLHF's ``serve_rm`` and an in-process reward model do;
* the same micro-batches after sorting all items by length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MICRO_BATCH = 32
ONE_ITEM_CALLERS = 64
GROUP_CALLERS = 8


@dataclass(frozen=True)
class Workload:
    items: list[Any]  # rmserve.formatting.Encoded, in arrival order
    group: int
    description: str

    @property
    def lengths(self) -> list[int]:
        return [len(e.ids) for e in self.items]


def log_uniform(rng: np.random.Generator, low: int, high: int, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size=n)).astype(int)


def grpo_workload(
    prompts: int,
    *,
    group: int = 8,
    prompt_tokens: tuple[int, int] = (32, 1024),
    response_tokens: tuple[int, int] = (64, 3072),
    max_length: int = 4096,
    vocab_used: int = 700,
    seed: int = 0,
) -> Workload:
    from rmserve.formatting import Encoded

    rng = np.random.default_rng(seed)
    items = []
    for prompt_len in log_uniform(rng, *prompt_tokens, prompts):
        prompt = rng.integers(3, vocab_used, size=int(prompt_len))
        for response_len in log_uniform(rng, *response_tokens, group):
            response = rng.integers(3, vocab_used, size=int(min(response_len, max_length - prompt_len)))
            ids = tuple(int(i) for i in np.concatenate([prompt, response]))
            items.append(Encoded(ids=ids, type_ids=None, truncated=False))
    lengths = [len(e.ids) for e in items]
    (p_low, p_high), (r_low, r_high) = prompt_tokens, response_tokens
    description = (
        f"{prompts} prompts x {group} responses, prompts {p_low}-{p_high} and responses {r_low}-{r_high} "
        f"tokens log-uniform (seed {seed}), capped at {max_length}: items {min(lengths)}-{max(lengths)} "
        f"tokens, mean {np.mean(lengths):.0f}"
    )
    return Workload(items, group, description)


def padded_fraction(batches: Sequence[Sequence[int]]) -> float:
    """Padding's share of the positions computed, for batches given as their rows' lengths."""
    computed = sum(len(b) * max(b) for b in batches)
    real = sum(sum(b) for b in batches)
    return 1.0 - real / computed


def micro_batches(lengths: Sequence[int], *, sort: bool, size: int = MICRO_BATCH) -> list[list[int]]:
    """Row indices of fixed ``size`` micro-batches, in arrival order or after sorting by length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort else list(range(len(lengths)))
    return [order[i : i + size] for i in range(0, len(order), size)]


@dataclass
class CountingEngine:
    """An engine that also counts the positions its batches compute, for the padded-token fraction."""

    engine: Any
    computed: int = 0
    real: int = 0
    info: Any = field(init=False)

    def __post_init__(self) -> None:
        self.info = self.engine.info

    def infer(self, batch: Any) -> np.ndarray:
        rows, width = batch.shape
        self.computed += rows * width
        self.real += int(batch.attention_mask.sum())
        return self.engine.infer(batch)

    def close(self) -> None:
        self.engine.close()

    def reset(self) -> None:
        self.computed = self.real = 0

    @property
    def padded_fraction(self) -> float:
        return 1.0 - self.real / self.computed if self.computed else 0.0


async def rmserve_rates(batcher: Any, counter: CountingEngine, workload: Workload) -> list[dict[str, Any]]:
    """pairs/s and padded-token fraction of the batcher fed 1-item and group requests."""
    items = workload.items
    shapes = [
        (f"rmserve, 1-item requests, {ONE_ITEM_CALLERS} callers", [[e] for e in items], ONE_ITEM_CALLERS),
        (
            f"rmserve, {workload.group}-item group requests, {GROUP_CALLERS} callers",
            [items[i : i + workload.group] for i in range(0, len(items), workload.group)],
            GROUP_CALLERS,
        ),
    ]
    rows = []
    for path, requests, callers in shapes:
        await _drive(batcher, requests[: max(1, len(requests) // 4)], callers)  # warm this mix
        counter.reset()
        seconds = await _drive(batcher, requests, callers)
        rows.append(_row(path, len(items), seconds, counter.padded_fraction, workload))
    return rows


async def _drive(batcher: Any, requests: list[list[Any]], callers: int) -> float:
    waiting = list(reversed(requests))

    async def caller() -> None:
        while waiting:
            await asyncio.gather(*batcher.submit(waiting.pop(), time.monotonic() + 600))

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return time.perf_counter() - started


def hf_rates(
    forward: Callable[[np.ndarray, np.ndarray], Any],
    sync: Callable[[], None],
    workload: Workload,
    pad_id: int,
) -> list[dict[str, Any]]:
    """HF micro-batches of 32, arrival order and sorted: ``forward(ids, mask)`` runs one."""
    lengths = workload.lengths
    rows = []
    for sort in (False, True):
        plan = micro_batches(lengths, sort=sort)
        batches = [_pad([workload.items[i].ids for i in idx], pad_id) for idx in plan]
        forward(*batches[0])  # warm up
        sync()
        started = time.perf_counter()
        for ids, mask in batches:
            forward(ids, mask)
        sync()
        seconds = time.perf_counter() - started
        fraction = padded_fraction([[lengths[i] for i in idx] for idx in plan])
        order = "sorted by length" if sort else "arrival order"
        path = f"HF + SDPA, micro-batches of {MICRO_BATCH}, {order}, padding mask"
        rows.append(_row(path, len(lengths), seconds, fraction, workload))
    return rows


def _pad(rows: list[tuple[int, ...]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _row(path: str, items: int, seconds: float, fraction: float, workload: Workload) -> dict[str, Any]:
    return {
        "path": path,
        "items": items,
        "pairs_s": round(items / seconds, 2),
        "real_tokens_s": round(sum(workload.lengths) / seconds, 1),
        "padded_fraction": round(fraction, 4),
    }


def table(model: str, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows, each with its ratio to the arrival-order micro-batches."""
    arrival = next((r["pairs_s"] for r in rows if "arrival order" in r["path"]), None)
    lines = [
        "| bundle | path | items | pairs/s | real tokens/s | padded-token fraction "
        "| / arrival-order micro-batches |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = f"{r['pairs_s'] / arrival:.2f}x" if arrival else ""
        lines.append(
            f"| {model} | {r['path']} | {r['items']} | {r['pairs_s']:.1f} | {r['real_tokens_s']:.0f} "
            f"| {100 * r['padded_fraction']:.1f}% | {ratio} |"
        )
    return lines
