"""A lean bundle's two graphs share one weights file: the prefix-reuse graph (``model_past.onnx``) refers
to the scoring graph's bytes in ``model.onnx.data``, so the export writes each weight once.

Real tiny Qwen2 bundles, their weights pushed into external data by ``external_data_bytes=0``; ONNX
Runtime's CPU provider scores them, whole and with prefixes reused. A bundle in the layout exports
wrote before (each graph with its own data file) is made from a new one by giving the prefix-reuse
graph its own copy of the data file, as those exports did, and sealing it again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from rmserve.bundle import MANIFEST, MODEL_FILE, PAST_FILE, load_bundle, read_manifest, write_manifest
from rmserve.config import Settings
from rmserve.engines.base import pad_batch
from rmserve.engines.reuse import PrefixReusingEngine, with_prefix_reuse
from rmserve.engines.select import create_engine
from rmserve.models.export import export_bundle
from rmserve.models.heads import load_score_model
from rmserve.models.lean import write_lean_graph
from rmserve.models.lean.builder import INLINE_BYTES, SharedWeights, WeightFile
from tests.support.tiny import tiny_bundle, tiny_checkpoint

DATA = MODEL_FILE + ".data"
TOL = 1e-5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shared-weights")
    return tiny_bundle("qwen2", root, max_length=512, external_data_bytes=0)


def external(path: Path) -> dict[str, dict[str, str]]:
    """Each initializer kept in external data: name -> its location, offset and length."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        t.name: {e.key: e.value for e in t.external_data}
        for t in graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }


def inline_bytes(path: Path) -> list[int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [len(t.raw_data) for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]


def assert_one_weights_file(directory: Path) -> None:
    scoring, past = external(directory / MODEL_FILE), external(directory / PAST_FILE)
    assert scoring and past == scoring  # the same names at the same offsets and lengths
    assert {entry["location"] for entry in past.values()} == {DATA}
    assert max(inline_bytes(directory / PAST_FILE)) < INLINE_BYTES  # only small constants inline
    assert not (directory / (PAST_FILE + ".data")).exists()


def reuse_matches_the_whole_forward(directory: Path) -> None:
    loaded = load_bundle(directory)
    s = Settings(provider="cpu", precision="fp32", threads=1, streams=1)
    plain, _ = create_engine(loaded, s)
    reusing, about = with_prefix_reuse(create_engine(loaded, s)[0], loaded, s, lambda event, amount: None)
    assert about["enabled"], about
    assert isinstance(reusing, PrefixReusingEngine)
    pad = loaded.manifest.format.pad_token_id
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, 200, 120).tolist()
    rows = [prompt + rng.integers(5, 200, n).tolist() for n in (20, 45, 3, 31)]
    expected = plain.infer(pad_batch(rows, pad))
    np.testing.assert_allclose(reusing.infer(pad_batch(rows, pad)), expected, atol=TOL, rtol=0)
    alone = [reusing.infer(pad_batch([row], pad))[0] for row in rows]  # from the cached prompt
    np.testing.assert_allclose(alone, expected, atol=TOL, rtol=0)


def test_an_exported_bundle_with_a_prefix_reuse_graph_carries_one_weights_file(bundle: Path) -> None:
    m = load_bundle(bundle).manifest
    assert m.past_graph == PAST_FILE
    assert [f for f in m.files if f.endswith(".data")] == [DATA]
    assert_one_weights_file(bundle)


def test_exporting_again_gives_the_same_files_and_version(bundle: Path, tmp_path: Path) -> None:
    again = export_bundle(
        bundle.parent / "checkpoint", tmp_path / "again", name="other", max_length=512, external_data_bytes=0
    )
    assert again.version == read_manifest(bundle).version
    for name in (MODEL_FILE, PAST_FILE, DATA):
        assert (tmp_path / "again" / name).read_bytes() == (bundle / name).read_bytes(), name


def test_both_graphs_of_the_shared_file_score_and_reuse_equals_the_whole_forward(bundle: Path) -> None:
    reuse_matches_the_whole_forward(bundle)


def test_a_graph_built_from_the_loaded_model_shares_the_weights_file_too(tmp_path: Path) -> None:
    """The path without the checkpoint's safetensors: the weights come from the model's parameters and
    onnx writes model.onnx.data; the prefix-reuse graph refers to what it wrote."""
    model, _, _ = load_score_model(tiny_checkpoint("llama", tmp_path / "checkpoint"))
    out = tmp_path / "graphs"
    out.mkdir()
    written = write_lean_graph(model, 64, out, precision="fp32", external_data_bytes=0, past=True)
    assert written.past_graph == PAST_FILE
    assert_one_weights_file(out)


def test_a_bundle_whose_graphs_each_have_their_own_data_file_still_loads_and_reuses(
    bundle: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    own = PAST_FILE + ".data"
    shutil.copyfile(old / DATA, old / own)
    proto = onnx.load(str(old / PAST_FILE), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = own
    onnx.save_model(proto, str(old / PAST_FILE))
    fields = read_manifest(old).model_dump(mode="json")
    (old / MANIFEST).unlink()
    sealed = write_manifest(
        old, **{k: v for k, v in fields.items() if k not in ("files", "digest", "version")}
    )
    assert [f for f in sealed.files if f.endswith(".data")] == [DATA, own]
    assert set(external(old / PAST_FILE)) == set(external(old / MODEL_FILE))
    assert sealed.version != read_manifest(bundle).version  # other content, another version
    reuse_matches_the_whole_forward(old)


def test_a_shared_weight_is_referred_to_only_under_its_own_name_shape_and_type(tmp_path: Path) -> None:
    data = WeightFile(tmp_path / DATA)
    try:
        written = data.tensor(np.ones((16, 32), np.float32), "layer0/qkv_1")
    finally:
        data.close()
    shared = SharedWeights([written])
    same = shared.reference(np.zeros((16, 32), np.float32), "layer0/qkv_1")
    assert same is not None and same.external_data == written.external_data
    assert shared.reference(np.zeros((16, 32), np.float32), "layer0/qkv_2") is None
    with pytest.raises(ValueError, match="layer0/qkv_1"):
        shared.reference(np.zeros((32, 16), np.float32), "layer0/qkv_1")
    with pytest.raises(ValueError, match="float16"):
        shared.reference(np.zeros((16, 32), np.float16), "layer0/qkv_1")
