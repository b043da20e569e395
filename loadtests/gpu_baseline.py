"""The same-card baseline of the GPU check: what a trainer runs today, a few lines of transformers.

``AutoModelForSequenceClassification`` of the same shape (random init, seeded), in fp16 with
PyTorch SDPA attention, and the same under ``torch.compile``; full batches of random tokens at the
shapes the check measures rmserve's engine at (64 x 512, 32 x 2,048), median of 5 timed passes
after warm-up. In the CPU dry run it runs in fp32 (the same code, tiny shapes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

REPEATS = 5
SDPA = "HF + SDPA"
COMPILE = "HF + SDPA + torch.compile"


def forward_rate(forward: Callable[[], Any], items: int, sync: Callable[[], None]) -> float:
    """Items per second of ``forward`` (one batch of ``items``): median of REPEATS after 2 warm-ups."""
    for _ in range(2):
        forward()
    sync()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        forward()
        sync()
        times.append(time.perf_counter() - started)
    return items / float(np.median(times))


def measure(
    model: Any, shapes: list[tuple[int, int]], vocab_used: int, device: str
) -> dict[tuple[int, int], float]:
    """{(items, tokens): pairs/s} of ``model`` on full batches of random tokens."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates = {}
    for items, tokens in shapes:
        rng = np.random.default_rng(tokens)
        ids = torch.from_numpy(rng.integers(3, vocab_used, size=(items, tokens))).to(device)
        mask = torch.ones_like(ids)

        def forward(ids: Any = ids, mask: Any = mask) -> Any:
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask).logits

        rates[(items, tokens)] = forward_rate(forward, items, sync)
    return rates


def baseline(
    build: Callable[[], Any],
    shapes: list[tuple[int, int]],
    vocab_used: int,
    device: str,
    *,
    paths: set[str],
    report: Callable[[str, int, int, float], None],
    time_left: Callable[[], float],
) -> None:
    """HF + SDPA (``paths`` has "sdpa") and/or HF + SDPA + torch.compile ("compile");
    ``report(path, items, tokens, pairs/s)`` per row."""
    import torch

    model = build()
    if "sdpa" in paths:
        for (items, tokens), rate in measure(model, shapes, vocab_used, device).items():
            report(SDPA, items, tokens, rate)
    if "compile" in paths:
        compiled = torch.compile(model)
        for items, tokens in shapes:
            if time_left() < 90:  # a compile per shape takes a minute or so
                break
            rate = measure(compiled, [(items, tokens)], vocab_used, device)[(items, tokens)]
            report(COMPILE, items, tokens, rate)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
