"""Pairs -> token ids -> padded batches, through the server's own ``Formatter``.

Training truncates exactly as serving does (the prompt loses its oldest tokens first, the response is
kept); batches are grouped by length and padded per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rmserve.bundle import Bundle, Manifest
from rmserve.formatting import Formatter
from rmserve.models.data import PreferencePair
from rmserve.models.eval.pairs import encode_pairs
from rmserve.models.heads import ScoreModel, model_meta


def training_formatter(checkpoint: str | Path, model: ScoreModel, max_length: int) -> Formatter:
    """The server's Formatter for a checkpoint that has no bundle yet.

    Format settings and input names come from the exporter's own functions, and the tokenizer
    from the same ``tokenizer.json`` the bundle will ship; ``check_same_tokens`` proves it after
    export. Encoders read (prompt, response) as a text pair, decoders their chat template.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from rmserve.models.export import format_settings, input_names

    tokenizer_file = Path(checkpoint) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{checkpoint} has no tokenizer.json (a fast tokenizer is required)")
    hf_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    meta = model_meta(model, str(checkpoint), int(model.hf_model.config.pad_token_id))
    settings = format_settings(hf_tokenizer, meta, max_length=max_length, input_format=None)
    manifest = Manifest.model_construct(format=settings, inputs=input_names(meta))
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return Formatter(Bundle(path=Path(checkpoint), manifest=manifest), tokenizer)


class PairDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Token ids per pair (the server's encoding) and the length that batches are grouped by."""

    def __init__(self, formatter: Formatter, pairs: list[PreferencePair], *, by_length: bool = False) -> None:
        chosen, rejected = encode_pairs(formatter, pairs)
        rows = [
            {
                "chosen_ids": c.ids,
                "rejected_ids": r.ids,
                "chosen_types": c.type_ids or (),
                "rejected_types": r.type_ids or (),
                "margin": p.margin if p.margin is not None else 0.0,
            }
            for p, c, r in zip(pairs, chosen, rejected, strict=True)
        ]
        self.lengths = [max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)]
        if by_length:  # evaluation: fewer pad tokens, same accuracy
            order = sorted(range(len(rows)), key=self.lengths.__getitem__)
            rows, self.lengths = [rows[i] for i in order], [self.lengths[i] for i in order]
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@dataclass(frozen=True)
class PairCollator:
    """Chosen rows then rejected rows, right-padded to the longest row of this batch."""

    pad_id: int
    use_types: bool

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        types = [r["chosen_types"] for r in rows] + [r["rejected_types"] for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        type_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, t) in enumerate(zip(seqs, types, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            if t:
                type_ids[i, : len(t)] = torch.tensor(t)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "margin": torch.tensor([float(r["margin"]) for r in rows]),
        }
        if self.use_types:
            batch["token_type_ids"] = type_ids
        return batch
