"""rmserve train: a real Trainer run on a tiny checkpoint, and the shipped default bundle's accuracy."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from rmserve.bundle import CALIBRATION_FILE, default_bundle_path, load_bundle
from rmserve.models.data import data_digest, load_pairs, recorded_path
from rmserve.models.eval.pairs import pairwise_accuracy, score_bundle
from rmserve.models.train.command import main
from rmserve.models.train.config import TrainConfig
from rmserve.models.train.loop import average_weights, bradley_terry_loss, train
from rmserve.models.train.ship import TRAINING_RECORD
from tests.support.tiny import tiny_checkpoint

GOOD = [
    "The assistant explains the recipe for bread.",
    "Our team recommends a safe way to travel at night.",
    "The teacher describes why the sky is blue!",
    "This answer summarizes the history of Rome, briefly.",
]
BAD = [
    "I don't know, sorry.",
    "He ignores the rules of chess; carefully.",
    "She refuses a poem about rain.",
    "That is harmful and I won't help.",
]
QUESTIONS = ["Can you help me?", "how to fix a bicycle tyre?", "what 12 + 30 equals.", "a poem about rain."]


def tiny_pairs(path: Path, n: int = 64) -> Path:
    """n learnable pairs (a helpful reply over an unhelpful one), in all three row shapes."""
    rows = []
    for i in range(n):
        q, good, bad = QUESTIONS[i % 4], GOOD[(i // 4) % 4], BAD[(i // 16) % 4]
        if i % 3 == 0:
            rows.append(
                {
                    "chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                    "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}",
                    "subset": "hh",
                }
            )
        elif i % 3 == 1:
            rows.append({"prompt": q, "chosen": good, "rejected": bad, "subset": "explicit"})
        else:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": q}],
                    "subset": "conversational",
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_loss_is_bradley_terry_with_margin_and_centering() -> None:
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    plain = bradley_terry_loss(r_c, r_r, torch.zeros(2))
    assert plain.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2)
    with_margin = bradley_terry_loss(r_c, r_r, torch.tensor([1.0, 0.0]))
    assert with_margin.item() == pytest.approx(math.log(2.0))
    centred = bradley_terry_loss(r_c, r_r, torch.zeros(2), center_coef=0.1)
    assert centred.item() == pytest.approx(plain.item() + 0.1 * (9.0 + 0.0) / 2)
    smoothed = bradley_terry_loss(r_c, r_r, torch.zeros(2), label_smoothing=0.1)
    flipped = (math.log1p(math.exp(1.0)) + math.log(2.0)) / 2  # -log sigmoid(-d), mean over the pairs
    assert smoothed.item() == pytest.approx(0.9 * plain.item() + 0.1 * flipped)
    # Smoothing stops pushing once sigmoid(d) = 1 - eps: the loss is smallest there, not at d -> inf.
    d = torch.linspace(0.0, 8.0, 801)
    losses = [bradley_terry_loss(x[None], torch.zeros(1), torch.zeros(1), label_smoothing=0.1) for x in d]
    best = d[torch.argmin(torch.stack(losses))]
    assert best.item() == pytest.approx(math.log(0.9 / 0.1), abs=0.01)


def test_average_weights_is_the_elementwise_mean_and_keeps_integer_buffers() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([0, 1])}
    b = {"w": torch.tensor([3.0, 6.0]), "ids": torch.tensor([0, 1])}
    soup = average_weights([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0])) and torch.equal(soup["ids"], a["ids"])
    with pytest.raises(ValueError, match="ids"):
        average_weights([a, {"w": b["w"], "ids": torch.tensor([1, 0])}])


@pytest.mark.parametrize(
    ("arch", "pooling"), [("bert", "mean"), ("bert", "mean_response"), ("llama", "mean")]
)
def test_tiny_model_trains_end_to_end_into_a_bundle(
    arch: str,
    pooling: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tiny_pairs(tmp_path / "pairs.jsonl")
    base = tiny_checkpoint(arch, tmp_path / "base", seed=0)
    bundle_dir = tmp_path / "bundle"
    argv = [
        "--train",
        str(data),
        "--dev",
        str(data),
        "--base-model",
        str(base),
        "--output-dir",
        str(tmp_path / "run"),
        "--bundle-dir",
        str(bundle_dir),
        "--name",
        "tiny",
        "--max-length",
        "64",
        "--epochs",
        "8",
        "--lr",
        "2e-3",
        "--batch-size",
        "8",
        "--warmup-ratio",
        "0",
        "--seed",
        "0",
        "--calibration-pairs",
        "8",
        "--pooling",
        pooling,
    ]
    monkeypatch.setattr(sys, "argv", ["rmserve", "train", *argv])  # what the record's command reads
    assert main(argv) == 0
    out = capsys.readouterr().out  # the Trainer prints its logs first; the summary is last
    summary = json.loads(out[out.rindex('{\n  "checkpoint"') :])
    assert summary["bundle"] == str(bundle_dir)

    bundle = load_bundle(bundle_dir)  # the digest verifies
    training = bundle.manifest.training
    assert training is not None
    assert bundle.manifest.format.pooling == (pooling if arch == "bert" else "last_token")
    assert training["recipe"]["learning_rate"] == 2e-3 and training["seed"] == 0
    assert training["data"]["train"] == [{"path": recorded_path(data), "digest": data_digest(data)}]
    assert str(tmp_path) not in (bundle_dir / "manifest.json").read_text()  # no path of this machine
    assert training["command"].startswith(f"rmserve train --train {recorded_path(data)} --dev ")
    assert len(training["epochs"]) == 8

    # It ranks its own training pairs right, measured on the exported ONNX bundle.
    pairs = load_pairs(data)
    measured = pairwise_accuracy(score_bundle(bundle_dir, pairs), pairs)
    assert measured["accuracy"] > 0.9
    assert training["metrics"]["dev"]["accuracy"] == measured["accuracy"]
    assert (bundle_dir / CALIBRATION_FILE).read_text().count("\n") == 8


def test_loss_falls_and_training_is_reproducible(tmp_path: Path) -> None:
    data = tiny_pairs(tmp_path / "pairs.jsonl")
    base = tiny_checkpoint("bert", tmp_path / "base", seed=1)

    def run(name: str) -> list[float]:
        cfg = TrainConfig(
            train=(str(data),),
            base_model=str(base),
            output_dir=str(tmp_path / name),
            max_length=64,
            epochs=4,
            learning_rate=2e-3,
            batch_size=8,
            warmup_ratio=0.0,
            seed=3,
            bf16=True,
        )
        result = train(cfg)
        return [h["loss"] for h in result.history if "loss" in h]

    first, second = run("a"), run("b")
    assert first == second  # same seed, same data order, same weights
    assert first[-1] < first[0]


def test_soup_trains_members_averages_them_and_ships_through_export_only(tmp_path: Path) -> None:
    data = tiny_pairs(tmp_path / "pairs.jsonl")
    base = tiny_checkpoint("bert", tmp_path / "base", seed=2)
    common = dict(
        train=(str(data),),
        dev=(str(data),),
        base_model=str(base),
        max_length=64,
        epochs=3,
        learning_rate=2e-3,
        batch_size=8,
        warmup_ratio=0.0,
        seed=5,
        dropout=0.1,
    )
    single = train(TrainConfig(**common, output_dir=str(tmp_path / "single")))
    soup = train(TrainConfig(**common, output_dir=str(tmp_path / "soup"), soup=3))

    record = json.loads((soup.checkpoint / TRAINING_RECORD).read_text())
    assert record["soup"]["members"] == 3 and record["soup"]["seeds"] == [5, 6, 7]
    assert len(record["epochs"]) == 9 and {e["member"] for e in record["epochs"]} == {0, 1, 2}
    soup_losses = [h["loss"] for h in soup.history if "loss" in h]
    single_losses = [h["loss"] for h in single.history if "loss" in h]
    assert len(soup_losses) == 3 * len(single_losses)
    assert soup_losses[: len(single_losses)] == single_losses  # member 0 is exactly the single run
    assert soup_losses[len(single_losses) : 2 * len(single_losses)] != single_losses
    # The members really differ (data order, dropout), so the soup is not any one of them.
    from safetensors.torch import load_file

    soup_w = load_file(str(soup.checkpoint / "model.safetensors"))
    single_w = load_file(str(single.checkpoint / "model.safetensors"))
    assert any(not torch.equal(soup_w[k], single_w[k]) for k in soup_w if soup_w[k].is_floating_point())

    # --export-only: the checkpoint (trained "elsewhere") becomes a bundle with its own record.
    bundle_dir = tmp_path / "bundle"
    argv = [
        "--train",
        str(data),
        "--dev",
        str(data),
        "--output-dir",
        str(tmp_path / "soup"),
        "--bundle-dir",
        str(bundle_dir),
        "--name",
        "soup",
        "--export-only",
        "--calibration-pairs",
        "4",
    ]
    assert main(argv) == 0
    training = load_bundle(bundle_dir).manifest.training
    assert training is not None
    assert training["soup"] == record["soup"] and training["recipe"] == record["recipe"]
    pairs = load_pairs(data)
    measured = pairwise_accuracy(score_bundle(bundle_dir, pairs), pairs)
    assert training["metrics"]["dev"]["accuracy"] == measured["accuracy"] > 0.9


def test_export_only_needs_a_checkpoint_written_by_train(tmp_path: Path) -> None:
    data = tiny_pairs(tmp_path / "pairs.jsonl", n=8)
    argv = [
        "--train",
        str(data),
        "--output-dir",
        str(tmp_path / "nothing"),
        "--bundle-dir",
        str(tmp_path / "b"),
        "--export-only",
        "--base-model",
        "unused",
    ]
    with pytest.raises(FileNotFoundError, match="rmserve train"):
        main(argv)


def test_shipped_default_bundle_states_its_hh_dev_accuracy(shared_data: Path) -> None:
    bundle = load_bundle(default_bundle_path())  # raises if the digest does not verify
    training = bundle.manifest.training
    assert training is not None, "the default bundle must record how it was trained"
    stated = training["metrics"]["dev"]
    dev = shared_data / "hh-rlhf" / "dev.jsonl.gz"
    assert stated["data"] == [{"path": stated["data"][0]["path"], "digest": data_digest(dev)}]

    pairs = load_pairs(dev)
    measured = pairwise_accuracy(score_bundle(bundle.path, pairs), pairs)
    assert measured["pairs"] == stated["pairs"] == 1107
    assert round(measured["accuracy"], 3) == round(stated["accuracy"], 3)
    card = (bundle.path / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"{stated['accuracy']:.3f}" in card


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_shipped_default_bundle_names_no_path_of_the_machine_that_built_it() -> None:
    manifest = json.loads((default_bundle_path() / "manifest.json").read_text())
    absolute = [s for s in _strings(manifest) if "/work/" in s or s.startswith(("/", "~"))]
    assert not absolute
    assert " /" not in manifest["training"]["command"]
