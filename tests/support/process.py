"""Process reward test helpers: PyTorch's step values for the token ids the server builds, and items."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rmserve.bundle import load_bundle
from rmserve.formatting import Encoded, Formatter
from rmserve.items import Item, Message, StepsItem
from rmserve.kinds import kind_of

# Solutions in steps, of different lengths, some prompts as messages.
SOLUTIONS: list[StepsItem] = [
    StepsItem("What is 2 + 3 * 4?", ("3 * 4 = 12.", "2 + 12 = 14.", "The answer is 14.")),
    StepsItem("How many legs do 3 spiders have?", ("A spider has 8 legs.", "3 * 8 = 24.")),
    StepsItem("hi", ("hello",)),
    StepsItem(
        (Message("system", "Reason step by step."), Message("user", "Explain why the sky is blue " * 4)),
        ("Sunlight is scattered by air.", "Blue light scatters more than red.", "So the sky looks blue.")
        + ("We see the scattered light from every direction.",) * 2,
    ),
    StepsItem("What is 12 + 30?", ("12 + 30 = 42.",)),
]


def encoded(bundle_dir: Path, items: list[Item]) -> list[Encoded]:
    """The token ids and step positions the server builds for ``items``."""
    bundle = load_bundle(bundle_dir)
    return kind_of("t", bundle, Formatter(bundle)).encode(items)


def torch_step_values(bundle_dir: Path, items: list[Item]) -> list[list[float]]:
    """The PyTorch model's values at each item's step tokens, one unpadded item at a time."""
    import torch

    from rmserve.models.process_load import load_step_model

    process = load_bundle(bundle_dir).manifest.process
    assert process is not None
    tokens = tuple(process.label_tokens or ("+", "-"))
    model, _, _, _ = load_step_model(
        bundle_dir.parent / "checkpoint",
        step_token=process.step_token,
        rule=process.rule,
        label_tokens=tokens,
    )
    out = []
    for enc in encoded(bundle_dir, items):
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            values = model(ids, torch.ones_like(ids))[0].numpy()
        out.append([float(values[p]) for p in enc.positions])
    return out


def flat(values: list[list[float]]) -> np.ndarray:
    return np.array([v for row in values for v in row])
