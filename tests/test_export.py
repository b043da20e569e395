"""The exporter on tiny real checkpoints of every supported architecture: parity, padding, digest.

Each architecture is exported once (about 6 s of torch.export tracing each; the session's
``tiny_bundles`` are reused); tests that need a second export of the same seeded checkpoint
reuse its traced graph instead of tracing again, since tracing is what the first export covered.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import rmserve.models.export as export_mod
from rmserve.bundle import MODEL_FILE, BundleError, load_bundle
from rmserve.engines.batches import pad_rows
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.formatting import Formatter
from rmserve.items import ChatItem, Message, PairItem, TextItem
from rmserve.models.export import ExportError, export_bundle
from rmserve.models.export_command import main
from rmserve.models.parity import compared_sides
from tests.support.tiny import ARCHITECTURES, DECODERS, ENCODERS, FUSED, LEAN, NO_PAD, tiny_checkpoint

# The one architecture exported with its weights in model.onnx.data, by lowering the threshold.
EXTERNAL_ARCH = "mistral"


@pytest.fixture(scope="module")
def bundle_of(
    tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """arch -> its exported bundle (``checkpoint`` beside it), built on first use and kept."""
    built = dict(tiny_bundles)
    root = tmp_path_factory.mktemp("export")

    def get(arch: str) -> Path:
        if arch not in built:
            checkpoint = tiny_checkpoint(arch, root / arch / "checkpoint")
            external = {"external_data_bytes": 0} if arch == EXTERNAL_ARCH else {}
            export_bundle(checkpoint, root / arch / "bundle", name=f"tiny-{arch}", **external)
            built[arch] = root / arch / "bundle"
        return built[arch]

    return get


def checkpoint_of(bundle: Path) -> Path:
    return bundle.parent / "checkpoint"


def reuse_graph(
    monkeypatch: pytest.MonkeyPatch, source: Path, patch: Callable[[onnx.ModelProto], None] | None = None
) -> None:
    """Make export_bundle take ``source``'s traced graph (optionally edited) instead of tracing."""

    def fake_export(model: object, meta: object, directory: Path, **_: object) -> str:
        proto = onnx.load(str(source / MODEL_FILE))
        if patch is not None:
            patch(proto)
        onnx.save_model(proto, str(directory / MODEL_FILE))
        return "reused"

    monkeypatch.setattr(export_mod, "export_onnx", fake_export)


def shift_scores(proto: onnx.ModelProto) -> None:
    """A subtly broken graph: every score 0.01 too high."""
    graph = proto.graph
    producer = next(n for n in graph.node if "scores" in n.output)
    producer.output[list(producer.output).index("scores")] = "scores_unshifted"
    graph.initializer.append(numpy_helper.from_array(np.array(0.01, dtype=np.float32), "shift"))
    graph.node.append(helper.make_node("Add", ["scores_unshifted", "shift"], ["scores"]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_exports_with_parity(arch: str, bundle_of: Callable[[str], Path]) -> None:
    bundle = load_bundle(bundle_of(arch))  # also verifies the digest
    m = bundle.manifest
    p = m.parity
    assert p["max_rel_diff"] <= 1e-4 and p["max_abs_diff"] <= 1e-4 * max(1.0, *map(abs, p["score_range"]))
    assert p["batch_invariance_max"] <= 1e-5
    # A lean graph reads no padding mask: it is held to right padding, the only side it is fed.
    sides = ["right"] if arch in LEAN else ["right", "left"]
    assert p["n_texts"] == 32 and p["batch_sizes"] == [1, 7, 32] and p["padding_sides"] == sides
    assert m.output == "scores" and m.precision == "fp32" and m.calibration_file == "calibration.jsonl"
    assert (bundle.path / "calibration.jsonl").read_text().count("\n") == 64
    decoder = arch in DECODERS
    assert m.family == ("decoder" if decoder else "encoder")
    assert m.format.pooling == ("last_token" if decoder else "cls")
    assert m.format.input_format == ("chat_template" if decoder else "text_pair")
    assert m.format.add_special_tokens is not decoder
    assert ("token_type_ids" in m.inputs) is (arch == "bert")
    assert m.format.max_length == 128  # the tiny configs' max_position_embeddings
    assert ("model.onnx.data" in m.files) is (arch == EXTERNAL_ARCH)
    # A lean graph comes with its prefix-reuse variant (docs/prefix-reuse.md), in the digest's files.
    # (not the tiny Gemma-2's or Gemma-3's: a sliding window shorter than max_length needs a mask the
    # variant lacks)
    with_past = arch in LEAN and arch not in ("gemma2", "gemma3_text")
    assert (m.past_graph == "model_past.onnx" and "model_past.onnx" in m.files) is with_past
    # One weights file: the prefix-reuse graph refers to model.onnx.data (tests/test_shared_weights.py).
    assert "model_past.onnx.data" not in m.files
    # Decoders fuse their attention (one Attention op per layer, opset 23), Gemma-2 too on the lean graph.
    assert m.attention == ("fused:Attention" if arch in FUSED else "unfused")
    assert m.opset == (23 if arch in FUSED else 18)
    assert (m.graph, m.padding) == (("lean", "right") if arch in LEAN else ("traced", "any"))
    if arch in ENCODERS:
        assert m.graph_reason is None


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_scores_do_not_depend_on_the_batch_on_every_padding_side_the_bundle_takes(
    arch: str, bundle_of: Callable[[str], Path]
) -> None:
    """Both sides for a traced graph (it reads the mask); right alone for a lean one (it is refused
    left padding: tests/test_lean_graph.py)."""
    bundle = load_bundle(bundle_of(arch))
    items = [
        PairItem("Can you help me?", "Sure, here is how."),
        ChatItem((Message("user", "What is 12 + 30?"), Message("assistant", "42"))),
        TextItem("<s>no template at all"),
    ]
    encoded = Formatter(bundle).encode(items)
    pad = bundle.manifest.format.pad_token_id
    engine = OnnxRuntimeEngine(bundle.model_path)
    try:
        alone = np.concatenate([engine.infer(pad_rows([e], pad, "right")) for e in encoded])
        for side in compared_sides(bundle.manifest):
            assert np.abs(engine.infer(pad_rows(encoded, pad, side)) - alone).max() <= 1e-5, side
    finally:
        engine.close()
    assert compared_sides(bundle.manifest) == (("right",) if arch in LEAN else ("right", "left"))


def test_tokenizer_without_pad_token_pads_with_eos(bundle_of: Callable[[str], Path]) -> None:
    for arch in NO_PAD:
        bundle = bundle_of(arch)
        tokenizer = json.loads((bundle / "tokenizer.json").read_text())
        eos = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "</s>")
        assert load_bundle(bundle).manifest.format.pad_token_id == eos


def test_changed_byte_in_model_is_refused(bundle_of: Callable[[str], Path], tmp_path: Path) -> None:
    for arch in ("bert", EXTERNAL_ARCH):
        copy = shutil.copytree(bundle_of(arch), tmp_path / arch)
        victim = copy / ("model.onnx.data" if arch == EXTERNAL_ARCH else MODEL_FILE)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        with pytest.raises(BundleError, match="does not match"):
            load_bundle(copy)


def test_a_format_1_manifest_is_read_with_its_family_and_as_an_outcome_bundle(
    bundle_of: Callable[[str], Path], tmp_path: Path
) -> None:
    copy = shutil.copytree(bundle_of("bert"), tmp_path / "format-1")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["kind"] = manifest.pop("family")  # format 1 named the family "kind"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    read = load_bundle(copy).manifest  # the digest covers files and settings, not these names
    assert (read.family, read.kind) == ("encoder", "outcome")


def test_broken_graph_fails_parity_and_writes_nothing(
    bundle_of: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reuse_graph(monkeypatch, bundle_of("bert"), patch=shift_scores)
    dest = tmp_path / "out" / "bundle"
    with pytest.raises(ExportError, match=r"parity failed.*max_abs_diff=0\.01"):
        export_bundle(checkpoint_of(bundle_of("bert")), dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no staging directory left behind either


def test_optimize_keeps_parity_for_bert(
    bundle_of: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reuse_graph(monkeypatch, bundle_of("bert"))
    manifest = export_bundle(checkpoint_of(bundle_of("bert")), tmp_path / "fused", optimize=True)
    assert manifest.parity["optimized"] is True
    assert manifest.parity["fusions"]  # at least LayerNorm/GELU fuse on the dynamo graph
    assert manifest.parity["max_rel_diff"] <= 1e-4
    assert load_bundle(tmp_path / "fused").manifest.version != load_bundle(bundle_of("bert")).manifest.version


def same_files_but_the_manifest(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("arch", ["bert", "llama"])  # a traced graph and a lean one
def test_exporting_a_checkpoint_again_elsewhere_gives_the_same_version_and_the_same_files(
    arch: str, bundle_of: Callable[[str], Path], tmp_path: Path
) -> None:
    first = load_bundle(bundle_of(arch)).manifest
    again = export_bundle(checkpoint_of(bundle_of(arch)), tmp_path / "elsewhere", name="another-name")
    assert again.version == first.version and again.digest == first.digest
    same_files_but_the_manifest(bundle_of(arch), tmp_path / "elsewhere")


def test_cli_refuses_to_overwrite_and_reports_failure(
    bundle_of: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    existing = bundle_of("deberta-v2")
    assert main([str(checkpoint_of(existing)), str(existing)]) == 1
    assert "not empty" in capsys.readouterr().out
    assert load_bundle(existing)  # untouched


def test_cli_exports(
    bundle_of: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reuse_graph(monkeypatch, bundle_of("deberta-v2"))
    dest = tmp_path / "cli"
    argv = [str(checkpoint_of(bundle_of("deberta-v2"))), str(dest), "--name", "rm", "--max-length", "64"]
    assert main(argv) == 0
    manifest = load_bundle(dest).manifest
    assert manifest.name == "rm" and manifest.format.max_length == 64
    assert "exported rm version" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fp16_export_records_its_deviation_and_keeps_the_interface(
    arch: str, bundle_of: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32 = bundle_of(arch)
    reuse_graph(monkeypatch, fp32)
    manifest = export_bundle(checkpoint_of(fp32), tmp_path / "fp16", precision="fp16")
    assert manifest.precision == "fp16"
    deviation = manifest.parity["fp16"]
    assert deviation["pairwise_ranking_agreement"] >= 0.98 and deviation["max_rel_diff"] < 0.05
    assert manifest.parity["max_rel_diff"] <= 1e-4  # the fp32 graph it came from passed parity
    proto = onnx.load(str(tmp_path / "fp16" / MODEL_FILE))
    assert {i.type.tensor_type.elem_type for i in proto.graph.input} == {onnx.TensorProto.INT64}
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [onnx.TensorProto.FLOAT]
    big = [t for t in proto.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert load_bundle(tmp_path / "fp16").manifest.version != load_bundle(fp32).manifest.version


def test_mean_response_pooling_averages_the_responses_tokens_only(tmp_path: Path) -> None:
    """``rmserve_pooling: mean_response`` in torch and in the exported graph: segment 1 alone."""
    import torch

    from rmserve.models.heads import load_score_model

    checkpoint = tiny_checkpoint("bert", tmp_path / "checkpoint", seed=4, pooling="mean_response")
    export_bundle(checkpoint, tmp_path / "bundle", name="tiny-response")
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.manifest.format.pooling == "mean_response"
    items = [
        PairItem("Can you help me with a long question about bread?", "Sure, here is how."),
        PairItem("Hi", "A much longer answer that goes on for a while, with details."),
    ]
    encoded = Formatter(bundle).encode(items)
    batch = pad_rows(encoded, bundle.manifest.format.pad_token_id, "right")

    model, _, _ = load_score_model(checkpoint)
    ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
    assert batch.token_type_ids is not None
    types = torch.from_numpy(batch.token_type_ids)
    with torch.no_grad():
        hidden = model.hf_model.base_model(
            input_ids=ids, attention_mask=mask, token_type_ids=types
        ).last_hidden_state
        response = (types == 1) & (mask == 1)
        assert response.sum(dim=1).min() > 0 and (response != (mask == 1)).any()  # prompts are excluded
        pooled = torch.stack([hidden[i][response[i]].mean(dim=0) for i in range(len(items))])
        expected = model.hf_model.classifier(pooled)[:, 0].numpy()
        torch_scores = model(ids, mask, types).numpy()
    engine = OnnxRuntimeEngine(bundle.model_path)
    try:
        onnx_scores = engine.infer(batch)
    finally:
        engine.close()
    assert np.abs(torch_scores - expected).max() <= 1e-5
    assert np.abs(onnx_scores - expected).max() <= 1e-4

    # Without segment ids (DeBERTa-v2 has type_vocab_size 0) there is no response to pool over.
    deberta = tiny_checkpoint("deberta-v2", tmp_path / "deberta", pooling="mean_response")
    with pytest.raises(ValueError, match="segment ids"):
        load_score_model(deberta)
