"""Parity: does the exported graph score exactly what the PyTorch model scores, as served?

Token ids come from the server's own ``Formatter`` and batches from the server's own engine, so
parity covers the path a request takes. Three checks, on padded batches of real text:

* ONNX Runtime vs PyTorch on the same padded batch (sizes 1, 7, 32; right and left padding, or
  right alone for a bundle whose graph reads no padding mask: ``padding: right``, the lean graph),
  ``|onnx - torch| <= tolerance * max(1, |torch|)``: absolute near zero, relative for large scores;
* batch invariance: an item's score alone vs inside a padded batch, ``<= invariance_tolerance``
  on the same scale (left padding too for decoders that read the mask; an encoder's absolute
  positions move under left padding, so there it is compared against PyTorch only);
* every score finite.

A process bundle is held to the same checks at its step-token positions: the parity texts become
solutions in steps (each response cut at its sentences), and every step value of every item, under
every batch and padding, is compared (``reference_items``).
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmserve.bundle import Bundle, Manifest
from rmserve.engines.base import TokenBatch, available_cpus
from rmserve.engines.batches import Read, Side, engine_rows, score_rows
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.errors import InvalidItem
from rmserve.formatting import Encoded, Formatter
from rmserve.items import Item, Message, Messages, PairItem, StepsItem, split_hh
from rmserve.kinds import BundleKind, kind_of
from rmserve.models.authors import AuthorsReference
from rmserve.models.authors import compare as compare_with_authors
from rmserve.models.data import hh_dev_path
from rmserve.models.heads import ScoreModel
from rmserve.models.piecewise import PiecewiseEngine, how_run, ort_loader
from rmserve.models.process_heads import StepModel

# The torch side of a bundle: one score per row, or (process bundles) one value per token.
TorchModel = ScoreModel | StepModel

BATCH_SIZES = (1, 7, 32)
PADDING_SIDES: tuple[Side, ...] = ("right", "left")
# Transcripts longer than this are skipped: parity wants mixed lengths, not a CPU-hour on a 7B model.
MAX_PARITY_CHARS = 2500


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str

    def as_item(self, chat: bool) -> PairItem:
        """A request item; for chat-template bundles the HH prompt becomes a message list."""
        turns = hh_messages(self.prompt) if chat else None
        return PairItem(prompt=turns or self.prompt, response=self.response)

    def as_steps(self, chat: bool) -> StepsItem:
        """A process bundle's item: the response cut into its sentences, each one step."""
        pair = self.as_item(chat)
        sentences = [s for s in re.split(r"(?<=[.!?;:])\s+", self.response.strip()) if s]
        return StepsItem(pair.prompt, tuple(sentences) or (self.response,))


def hh_messages(prompt: str) -> Messages | None:
    """ "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" -> (user a, assistant b, user c)."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    if parts[0].strip() or len(parts) < 3:
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [Message(roles[r], t.strip()) for r, t in zip(parts[1::2], parts[2::2], strict=True)]
    if turns and turns[-1].role == "assistant" and not turns[-1].content:
        turns.pop()  # the trailing "Assistant:" marker the response follows
    return tuple(turns) or None


def builtin_pairs() -> list[Pair]:
    """64 prompt/response pairs of our own writing: good, terse, refusing and off-topic answers."""
    prompts = [
        (
            "How do I boil an egg?",
            "Put the egg in boiling water for about nine minutes, then cool it in cold "
            "water so the shell comes off cleanly.",
        ),
        (
            "What is the capital of Australia?",
            "Canberra. Many people guess Sydney, but Canberra was chosen "
            "as a compromise between Sydney and Melbourne.",
        ),
        (
            "Can you explain what a hash table is?",
            "A hash table stores values under keys. A hash function "
            "turns each key into a slot index, so lookups take roughly constant time on average; collisions "
            "are handled by chaining or by probing for the next free slot.",
        ),
        (
            "Write a haiku about autumn.",
            "Red leaves drift and fall / the river carries them south / cold light on the stones",
        ),
        (
            "My code throws KeyError: 'user'. What does that mean?",
            "Your dictionary has no key named 'user'. "
            "Check where it is filled in, or use d.get('user') if the key may legitimately be missing.",
        ),
        (
            "Is it safe to mix bleach and ammonia for cleaning?",
            "No. Mixing them releases chloramine gas, "
            "which can badly hurt your lungs. Use one product at a time and ventilate the room.",
        ),
        (
            "Give me three tips for a job interview.",
            "Research the company, prepare two or three concrete "
            "stories about your work, and bring questions of your own for the interviewer.",
        ),
        ("Translate 'good morning' into French.", "Bonjour."),
        (
            "Why is the sea salty?",
            "Rivers carry dissolved minerals from rocks into the ocean. Water "
            "evaporates but the salts stay behind, so over millions of years they accumulated.",
        ),
        ("How many legs does a spider have?", "Eight."),
        (
            "Summarize the plot of Romeo and Juliet in two sentences.",
            "Two young lovers from feuding families in Verona marry in secret. "
            "A chain of misunderstandings ends with both of them dead, which finally "
            "reconciles their families.",
        ),
        ("What's a good name for a grey cat?", "Smokey, Ash, Pebble or Earl Grey are all popular choices."),
        (
            "Help me write a polite email declining a meeting.",
            "Hi Sam, thank you for the invitation. "
            "Unfortunately I can't make it on Thursday; could you share the notes afterwards? Best, Alex",
        ),
        ("What is 17 times 23?", "17 x 23 = 391."),
        (
            "How can I get better sleep?",
            "Keep a regular schedule, avoid screens and caffeine late in the "
            "day, keep the bedroom cool and dark, and get some daylight in the morning.",
        ),
        (
            "Tell me how to pick a lock to get into my neighbour's house.",
            "I can't help with getting into "
            "someone else's home. If you are locked out of your own place, a licensed locksmith can help.",
        ),
    ]
    out: list[Pair] = []
    for question, good in prompts:
        human = f"\n\nHuman: {question}\n\nAssistant:"
        out += [
            Pair(human, good),
            Pair(human, good.split(".")[0].split(",")[0] + "."),  # terse, often incomplete
            Pair(human, "I'm sorry, but I can't help with that request."),
            Pair(human, "Bananas are an excellent source of potassium and are best eaten ripe."),
        ]
    return out


def hh_pairs(path: Path, limit: int) -> list[Pair]:
    """``limit`` pairs from an HH-RLHF JSONL(.gz) file, spread over the range of lengths."""
    opener = gzip.open if path.suffix == ".gz" else open
    pairs: list[Pair] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            for key in ("chosen", "rejected"):
                text = record.get(key)
                split = split_hh(text) if isinstance(text, str) and len(text) <= MAX_PARITY_CHARS else None
                if split is not None and split[1]:
                    pairs.append(Pair(*split))
    return spread_by_length(pairs, limit)


def spread_by_length(pairs: Sequence[Pair], limit: int) -> list[Pair]:
    """Evenly spaced picks from the pairs sorted by length: short, long and everything between."""
    if len(pairs) <= limit:
        return list(pairs)
    ranked = sorted(pairs, key=lambda p: (len(p.prompt) + len(p.response), p.prompt, p.response))
    picks = np.linspace(0, len(ranked) - 1, num=limit).round().astype(int)
    return [ranked[i] for i in picks]


def reference_pairs(limit: int = 32) -> tuple[list[Pair], str]:
    """Real text when the shared HH-RLHF dev split is present, else our built-in pairs; and which."""
    path = hh_dev_path()
    if path.is_file():
        pairs = hh_pairs(path, limit)
        if pairs:
            return pairs, f"hh-rlhf dev ({path.name})"
    return spread_by_length(builtin_pairs(), limit), "builtin"


def compared_sides(manifest: Manifest) -> tuple[Side, ...]:
    """The padding sides a bundle's scores are compared with PyTorch's on."""
    return ("right",) if manifest.padding == "right" else PADDING_SIDES


def invariance_sides(manifest: Manifest) -> tuple[Side, ...]:
    """The padding sides on which an item must score as it does alone (see the module docstring)."""
    return PADDING_SIDES if manifest.family == "decoder" and manifest.padding != "right" else ("right",)


def torch_scores(model: TorchModel, batch: TokenBatch) -> np.ndarray:
    """The PyTorch reference on exactly the arrays the engine receives, on the model's own device:
    ``[rows]`` scores, or a process model's ``[rows, width]`` values."""
    device = next(model.parameters()).device
    tt = batch.token_type_ids
    with torch.inference_mode():
        out = model(
            torch.from_numpy(batch.input_ids).to(device),
            torch.from_numpy(batch.attention_mask).to(device),
            torch.from_numpy(tt).to(device) if tt is not None else None,
        )
    values = out.detach().to(torch.float32).cpu().numpy()
    return values if values.ndim == 2 else values.reshape(-1)


def reference_scores(
    model: TorchModel, encoded: Sequence[Encoded], pad_id: int, batch: int = 32, *, read: Read | None = None
) -> np.ndarray:
    """fp32 PyTorch values of ``encoded``: one score per item, or what ``read`` takes from each row
    (right padding leaves a value unchanged)."""
    return score_rows(encoded, functools.partial(torch_scores, model), pad_id, batch_items=batch, read=read)


def reference_items(bundle: Bundle, pairs: Sequence[Pair]) -> tuple[list[Encoded], Read]:
    """``pairs`` as the bundle's kind takes them, encoded as served, and how to read a row of output:
    one score per item, or a process bundle's values at its step tokens (sentences as steps)."""
    formatter = Formatter(bundle)
    kind = kind_of(bundle.manifest.name, bundle, formatter)
    chat = bundle.manifest.format.input_format == "chat_template"
    items: list[Item] = [p.as_item(chat) if kind.step_token is None else p.as_steps(chat) for p in pairs]
    if bundle.manifest.format.gate_pattern:
        # A gating head reads the prompt end; a text cut past it is refused as the server refuses it.
        items = [item for item in items if _served(kind, item)]
    return kind.encode(items), kind.values


def _served(kind: BundleKind, item: Item) -> bool:
    try:
        kind.encode([item])
    except InvalidItem:
        return False
    return True


def scaled_diff(a: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|a - ref| / max(1, |ref|): absolute for small scores, relative for large ones."""
    return np.abs(a - reference) / np.maximum(1.0, np.abs(reference))


@dataclass
class ParityReport:
    """What parity measured; ``problems`` is empty when the export may ship."""

    text_source: str
    n_texts: int
    batch_sizes: list[int]
    padding_sides: list[str]
    tolerance: float
    invariance_tolerance: float
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    batch_invariance_max: float = 0.0
    left_padding_invariant: bool = False
    truncated_texts: int = 0
    score_range: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_manifest(self) -> dict[str, Any]:
        import onnxruntime

        out = {k: v for k, v in self.__dict__.items() if k not in ("problems", "extra")}
        out |= {
            "rule": "|onnx - torch| <= tolerance * max(1, |torch|); invariance on the same scale",
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            **self.extra,
        }
        return out


def check_parity(
    bundle: Bundle,
    model: TorchModel,
    pairs: Sequence[Pair],
    *,
    text_source: str,
    tolerance: float = 1e-4,
    invariance_tolerance: float = 1e-5,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    authors: AuthorsReference | None = None,
    piecewise: bool = False,
) -> ParityReport:
    """Score ``pairs`` through the bundle (as served) and through ``model``; see the module doc.
    With ``authors``, the served token ids and scores are also held to the family's reference usage
    (models/authors.py), recorded as ``reference``. ``piecewise`` (a streamed export): ONNX Runtime
    runs the graph a piece at a time (models/piecewise.py; in fp32 bit for bit the whole graph's
    scores), so the check holds one piece's weights, not the model's."""
    encoded, read = reference_items(bundle, pairs)
    pad_id = bundle.manifest.format.pad_token_id
    engine: OnnxRuntimeEngine | PiecewiseEngine
    if piecewise:
        engine = PiecewiseEngine(
            bundle.model_path, ort_loader, provider="cpu", precision="fp32", threads=available_cpus()
        )
    else:
        engine = OnnxRuntimeEngine(bundle.model_path, provider="cpu", threads=available_cpus())
    report = ParityReport(
        text_source=text_source,
        n_texts=len(pairs),
        batch_sizes=list(batch_sizes),
        padding_sides=list(compared_sides(bundle.manifest)),
        tolerance=tolerance,
        invariance_tolerance=invariance_tolerance,
        truncated_texts=sum(e.truncated for e in encoded),
    )
    if bundle.manifest.kind == "process":
        report.extra["values"] = f"step values at {sum(len(e.positions) for e in encoded)} step tokens"
    try:
        sides = compared_sides(bundle.manifest)
        served = _compare(engine, model, encoded, pad_id, batch_sizes, sides, report, read)
        if authors is not None:
            report.extra["reference"], problems = compare_with_authors(bundle, engine, authors, tolerance)
            report.problems += problems
    finally:
        engine.close()
    if piecewise:
        report.extra["engine"] = f"onnxruntime cpu, {how_run(engine.info.detail['pieces'])}"
    _check_invariance(served, invariance_sides(bundle.manifest), report)
    if report.max_rel_diff > tolerance:
        report.problems.append(
            f"ONNX Runtime differs from PyTorch by up to {report.max_rel_diff:.3g} (scaled; "
            f"{report.max_abs_diff:.3g} absolute), over the tolerance {tolerance:g}"
        )
    return report


def _compare(
    engine: OnnxRuntimeEngine | PiecewiseEngine,
    model: TorchModel,
    encoded: Sequence[Encoded],
    pad_id: int,
    batch_sizes: Sequence[int],
    sides: tuple[Side, ...],
    report: ParityReport,
    read: Read,
) -> dict[tuple[str, int], np.ndarray]:
    """Run every (side, batch size); return the engine's score for each item under each.

    PyTorch runs on exactly the same padded batches (consecutive items, unsorted), except for
    batches of one: an unpadded item's reference is its PyTorch score from the right-padded
    largest batch (right padding leaves a score unchanged), which spares a per-item PyTorch call
    that dominates the cost.
    """
    reference = functools.partial(torch_scores, model)
    served: dict[tuple[str, int], np.ndarray] = {}
    alone_ref: np.ndarray | None = None
    low, high = np.inf, -np.inf
    for side in sides:
        for size in sorted(batch_sizes, reverse=True):
            onnx = engine_rows(encoded, engine, pad_id, batch_items=size, side=side, sort=False, read=read)
            if size == 1 and alone_ref is not None:
                ref = alone_ref
            else:
                ref = score_rows(
                    encoded, reference, pad_id, batch_items=size, side=side, sort=False, read=read
                )
            if not (np.isfinite(onnx).all() and np.isfinite(ref).all()):
                report.problems.append(f"non-finite scores ({side} padding, batch size {size})")
                onnx, ref = np.nan_to_num(onnx), np.nan_to_num(ref)
            report.max_abs_diff = max(report.max_abs_diff, float(np.abs(onnx - ref).max()))
            report.max_rel_diff = max(report.max_rel_diff, float(scaled_diff(onnx, ref).max()))
            low, high = min(low, float(ref.min())), max(high, float(ref.max()))
            served[(side, size)] = onnx
            if side == "right" and alone_ref is None:
                alone_ref = ref
    report.score_range = [low, high]
    return served


def _check_invariance(
    served: dict[tuple[str, int], np.ndarray], sides: tuple[Side, ...], report: ParityReport
) -> None:
    alone = served[("right", min(s for _, s in served))]
    report.left_padding_invariant = "left" in sides
    worst = 0.0
    for (side, _size), scores in served.items():
        if side in sides:
            worst = max(worst, float(scaled_diff(scores, alone).max()))
    report.batch_invariance_max = worst
    if worst > report.invariance_tolerance:
        report.problems.append(
            f"an item's score changes with its batch by up to {worst:.3g}, "
            f"over {report.invariance_tolerance:g}"
        )
