"""Gemma-3 text reward models (``Gemma3TextForSequenceClassification``, model_type ``gemma3_text``) on the
lean graph: per-head q/k norms, two pairs of rotary tables (``rope_local_base_freq`` for the sliding
layers, ``rope_theta`` with linear scaling for the global ones), a window shorter than max_length, the
sandwich norms and the scaled embeddings; held to transformers' eager forward in float32, in bf16 and
fp16 bundles, streamed, and with the prefix-reuse graph where the window allows one. The image-text
class (``Gemma3ForSequenceClassification``, model_type ``gemma3``) exports its text decoder the same way.

The tiny checkpoint (tests/support/tiny.py) has a sliding layer then a global one, window 16 against
max_length 128, and the 4B+ configs' ``rope_scaling`` (linear, factor 8) on its global layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoConfig, AutoModelForSequenceClassification

from rmserve.bundle import MODEL_FILE, PAST_FILE, load_bundle
from rmserve.config import Settings
from rmserve.engines.base import pad_batch
from rmserve.engines.batches import pad_rows
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.engines.reuse import PrefixReusingEngine, with_prefix_reuse
from rmserve.engines.select import create_engine
from rmserve.formatting import Formatter
from rmserve.items import PairItem
from rmserve.models.export import export_bundle
from rmserve.models.heads import load_score_model
from rmserve.models.lean import why_not_lean
from rmserve.models.lean.source import SafetensorsSource
from rmserve.models.parity import builtin_pairs, spread_by_length, torch_scores
from tests.support.tiny import tiny_bundle, tiny_checkpoint

LAYERS, HEAD_DIM, WINDOW = 2, 8, 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle("gemma3_text", tmp_path_factory.mktemp("gemma3"))


def mixed_items(n: int = 32) -> list[PairItem]:
    pairs = spread_by_length(builtin_pairs(), n - 2)
    items = [PairItem(p.prompt, p.response) for p in pairs]
    return items + [PairItem("hi", "yo"), PairItem("Tell me everything. " * 12, "Here it is. " * 10)]


def infer(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's scores of the mixed items, right-padded in one batch, and the padded ids."""
    bundle = load_bundle(bundle_dir)
    pad = bundle.manifest.format.pad_token_id
    batch = pad_rows(Formatter(bundle).encode(mixed_items()), pad, "right")
    engine = OnnxRuntimeEngine(bundle.model_path)
    try:
        return engine.infer(batch), batch.input_ids
    finally:
        engine.close()


def table(theta: float, factor: float, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate-half cos/sin at positions 0 .. max_length - 1: frequencies ``theta ** (-2i / head_dim)``,
    divided by ``factor`` (transformers' linear rope, modeling_rope_utils.py)."""
    inv = 1.0 / (theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)) / factor
    angles = np.arange(max_length, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angles), np.sin(angles)


def test_a_gemma3_text_reward_model_takes_the_lean_graph_with_two_rotary_tables_and_per_head_norms(
    bundle: Path,
) -> None:
    manifest = load_bundle(bundle).manifest
    assert (manifest.graph, manifest.padding, manifest.model_type) == ("lean", "right", "gemma3_text")
    assert manifest.exporter["lean"]["nodes_per_layer"] == 23  # type: ignore[attr-defined]
    assert manifest.parity["max_abs_diff"] <= 1e-5
    model = onnx.load(str(bundle / MODEL_FILE))
    nodes = model.graph.node
    by_layer = {i: [n for n in nodes if n.name.startswith(f"layer{i}/")] for i in range(LAYERS)}
    assert {len(v) for v in by_layer.values()} == {23}
    for i, layer in by_layer.items():
        ops = [n.op_type for n in layer]
        # input, q, k, post-attention, pre- and post-feed-forward norms; q/k each reshaped per head.
        assert ops.count("RMSNormalization") == 6 and ops.count("Reshape") == 4 and "Gelu" in ops
        attention = next(n for n in layer if n.op_type == "Attention")
        assert "softcap" not in {a.name for a in attention.attribute}  # None in Gemma-3's configs
        # Layer 0 slides (window 16 < 128: a mask, and the local tables); layer 1 is global.
        assert len(attention.input) == (4 if i == 0 else 3)
        tables = {tuple(n.input[1:3]) for n in layer if n.op_type == "RotaryEmbedding"}
        assert tables == ({("rope_local_cos", "rope_local_sin")} if i == 0 else {("rope_cos", "rope_sin")})
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for (cos, sin), names in (
        (table(1_000_000.0, 8.0, 128), ("rope_cos", "rope_sin")),
        (table(10_000.0, 1.0, 128), ("rope_local_cos", "rope_local_sin")),
    ):
        np.testing.assert_allclose(weights[names[0]], cos, atol=1e-6)
        np.testing.assert_allclose(weights[names[1]], sin, atol=1e-6)
    # The window is shorter than max_length, so no prefix-reuse graph: Gemma-2's rule.
    assert manifest.past_graph is None and not (bundle / PAST_FILE).exists()


def test_gemma3_fp32_scores_equal_transformers_eager_forward_on_items_longer_than_the_window(
    bundle: Path,
) -> None:
    served, ids = infer(bundle)
    checkpoint = bundle.parent / "checkpoint"
    model, _, _ = load_score_model(checkpoint)  # eager attention, fp32
    assert model.hf_model.config._attn_implementation == "eager"
    pad = load_bundle(bundle).manifest.format.pad_token_id
    mask = (ids != pad).astype(np.int64)
    lengths = mask.sum(axis=1)
    assert lengths.min() > WINDOW and lengths.min() < lengths.max()  # past the window, padded
    batch = pad_rows(Formatter(load_bundle(bundle)).encode(mixed_items()), pad, "right")
    np.testing.assert_allclose(served, torch_scores(model, batch), rtol=1e-4, atol=1e-5)
    # And against the checkpoint's own class, one unpadded row at a time, as transformers scores it.
    hf = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.inference_mode():
        rows = [torch.tensor(row[:n]).unsqueeze(0) for row, n in zip(ids, lengths, strict=True)]
        own = np.array([float(hf(input_ids=row).logits[0, 0]) for row in rows])
    np.testing.assert_allclose(served, own, rtol=1e-4, atol=1e-5)


def test_gemma3_exports_a_bf16_bundle_and_its_fp16_bundle_is_decided_by_measured_headroom(
    bundle: Path, tmp_path: Path
) -> None:
    checkpoint = bundle.parent / "checkpoint"
    bf16 = export_bundle(checkpoint, tmp_path / "bf16", precision="bf16")
    assert bf16.graph == "lean" and bf16.parity["bf16"]["residual_guard"] is False
    assert bf16.parity["bf16"]["pairwise_ranking_agreement"] >= 0.98
    fp16 = export_bundle(checkpoint, tmp_path / "fp16", precision="fp16")
    record = fp16.parity["fp16"]
    assert record["residual_guard"] is (not record["headroom"]["fits_fp16"])
    assert record["headroom"]["residual_max_abs"] > 0


def test_a_streamed_gemma3_bundle_scores_what_the_bundle_built_in_memory_scores(
    bundle: Path, tmp_path: Path
) -> None:
    checkpoint = bundle.parent / "checkpoint"
    streamed = export_bundle(checkpoint, tmp_path / "streamed", external_data_bytes=0)
    assert streamed.exporter["weights"] == "streamed from the checkpoint's safetensors"
    assert "model.onnx.data" in streamed.files and streamed.parity["max_abs_diff"] <= 1e-5
    np.testing.assert_array_equal(infer(tmp_path / "streamed")[0], infer(bundle)[0])


def test_a_gemma3_window_as_long_as_max_length_gets_the_prefix_reuse_graph_and_the_same_scores(
    tmp_path: Path,
) -> None:
    checkpoint = tiny_checkpoint("gemma3_text", tmp_path / "checkpoint", sizes={"sliding_window": 256})
    manifest = export_bundle(checkpoint, tmp_path / "bundle", max_length=256)
    assert manifest.past_graph == PAST_FILE
    loaded = load_bundle(tmp_path / "bundle")
    settings = Settings(provider="cpu", precision="fp32", threads=1, streams=1)
    plain, _ = create_engine(loaded, settings)
    reusing, about = with_prefix_reuse(create_engine(loaded, settings)[0], loaded, settings, lambda *_: None)
    assert about["enabled"] and isinstance(reusing, PrefixReusingEngine)
    rng = np.random.default_rng(0)
    shared = rng.integers(5, 200, 150).tolist()
    rows = [shared + rng.integers(5, 200, n).tolist() for n in (20, 45, 3, 70)]
    pad = loaded.manifest.format.pad_token_id
    expected = plain.infer(pad_batch(rows, pad))
    np.testing.assert_allclose(reusing.infer(pad_batch(rows, pad)), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose([reusing.infer(pad_batch([r], pad))[0] for r in rows], expected, atol=1e-5)


def image_text_checkpoint(directory: Path) -> Path:
    """The tiny Gemma-3 text decoder as a ``Gemma3ForSequenceClassification`` (model_type ``gemma3``): its
    config under ``text_config`` beside a tiny SigLIP tower, saved as transformers saves it (the decoder's
    weights under ``language_model.model.``)."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = tiny_checkpoint("gemma3_text", directory / "text")
    tokenizer = AutoTokenizer.from_pretrained(text)
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        vision_use_head=False,  # as in Gemma-3's configs
    )
    config = Gemma3Config(
        text_config=Gemma3TextConfig.from_pretrained(text).to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        num_labels=1,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.architectures = [type(model).__name__]
    out = directory / "image-text"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_gemma3_image_text_classifier_exports_its_text_decoder_and_scores_as_transformers_does(
    tmp_path: Path,
) -> None:
    checkpoint = image_text_checkpoint(tmp_path)
    stored = SafetensorsSource(checkpoint).names()
    assert "language_model.model.embed_tokens.weight" in stored and "score.weight" in stored
    manifest = export_bundle(checkpoint, tmp_path / "bundle", external_data_bytes=0)
    assert (manifest.model_type, manifest.architecture) == ("gemma3", "Gemma3ForSequenceClassification")
    assert manifest.graph == "lean" and manifest.exporter["lean"]["nodes_per_layer"] == 23  # type: ignore[attr-defined]
    assert manifest.model_family is not None and manifest.model_family["name"] == "gemma3-text"
    assert manifest.parity["reference"]["token_ids"] == "identical"
    # No vision weight is written: the graph reads text only.
    graph = onnx.load(str(tmp_path / "bundle" / MODEL_FILE), load_external_data=False)
    assert not [t.name for t in graph.graph.initializer if "vision" in t.name or "projector" in t.name]
    served, ids = infer(tmp_path / "bundle")
    hf = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    lengths = (ids != manifest.format.pad_token_id).sum(axis=1)
    with torch.inference_mode():
        rows = [torch.tensor(row[:n]).unsqueeze(0) for row, n in zip(ids, lengths, strict=True)]
        own = np.array([float(hf(input_ids=row).logits[0, 0]) for row in rows])
    assert np.ptp(own) > 0.5  # scores spread enough for the tolerance to mean something
    np.testing.assert_allclose(served, own, rtol=1e-4, atol=1e-5)


def test_a_gemma3_causal_lm_exports_as_a_process_model_on_the_lean_graph(tmp_path: Path) -> None:
    """Gemma3ForCausalLM read at a step token's label logits (its final soft-capping is None)."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmserve.models.process_heads import StepExport

    text = tiny_checkpoint("gemma3_text", tmp_path / "text")
    tokenizer = AutoTokenizer.from_pretrained(text)
    tokenizer.add_tokens([AddedToken("ки", special=False, normalized=False)])
    config = AutoConfig.from_pretrained(text, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    manifest = export_bundle(tmp_path / "lm", tmp_path / "bundle", step=StepExport("ки", None))
    assert (manifest.kind, manifest.graph) == ("process", "lean")
    assert manifest.exporter["lean"]["nodes_per_layer"] == 23  # type: ignore[attr-defined]
    assert manifest.parity["max_abs_diff"] <= 1e-5


def test_a_bidirectional_gemma3_config_keeps_off_the_lean_graph_with_the_reason() -> None:
    config = AutoConfig.for_model("gemma3_text", use_bidirectional_attention=True)
    assert why_not_lean(config, 128) == "use_bidirectional_attention: its attention is not causal"
    assert why_not_lean(AutoConfig.for_model("gemma3_text"), 128) is None
