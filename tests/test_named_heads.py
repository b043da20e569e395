"""Reward models whose head is not transformers' ``score`` layer, served as their authors' code scores them.

OpenRLHF: the reference is OpenRLHF's own code (tests/replicas/openrlhf/, verbatim from
OpenRLHF/OpenRLHF at 3c3be62): ``_get_reward_model`` (openrlhf/models/model.py) builds the
``RewardModel`` its ``train_rm`` saves, and ``RewardModelProxy`` (openrlhf/cli/serve_rm.py) answers
``/get_reward`` with it, tokenizing with ``get_tokenizer`` (openrlhf/utils/utils.py). Their modules
import deepspeed, peft and flash-attn's ring attention, none of which can be installed here, so each
definition is executed from the vendored file's own source (tests/support/replicas.py). The loading
lines of ``get_llm_for_sequence_regression`` for a reward model without LoRA, 4-bit or ZeRO-3 are
repeated here, each as the published function has it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
import torch
from torch import nn

from rmserve.bundle import load_bundle, read_manifest
from rmserve.formatting import Formatter
from rmserve.models.export import ExportError, export_bundle
from rmserve.models.named_heads import HeadRequest
from rmserve.openrlhf import query_items
from tests.support.replicas import CONVERSATIONS, llama3_tokenizer, llama_config, published_function
from tests.support.server import serve

MEAN, STD = 0.37, 2.5

# fp32: the reference's scores exactly (on a CPU with bf16 units ``auto`` serves gated bf16).
FP32 = {"RMSERVE_PRECISION": "fp32"}


def _reward_model_class(base_pretrained: Any, base: Any, prefix: str) -> Any:
    namespace: dict[str, Any] = {
        "torch": torch,
        "nn": nn,
        "Optional": Optional,
        "AutoConfig": __import__("transformers").AutoConfig,
        # Used only with packing_samples (ring attention), which these tests leave off.
        "gather_and_pad_tensor": None,
        "unpad_and_slice_tensor": None,
    }
    make = published_function("openrlhf/model.py", "_get_reward_model", namespace)
    return make(base_pretrained, base, prefix, False)


def openrlhf_checkpoint(directory: Path, *, prefix: str = "value_head", seed: int = 0) -> Path:
    """A checkpoint as OpenRLHF's train_rm saves it: its RewardModel class's save_pretrained, with
    ``value_head_prefix``, ``mean`` and ``std`` set on the config (openrlhf/cli/train_rm.py,
    openrlhf/trainer/rm_trainer.py)."""
    from transformers import LlamaModel, LlamaPreTrainedModel

    tokenizer = llama3_tokenizer()
    config = llama_config(tokenizer)
    config.normalize_reward = False
    torch.manual_seed(seed)
    model = _reward_model_class(LlamaPreTrainedModel, LlamaModel, prefix)(config)
    # train_rm's init_value_head draws std 1 / (hidden + 1); wider here so tiny models' rewards spread.
    nn.init.normal_(getattr(model, prefix).weight, std=0.5)
    model.config.value_head_prefix = prefix
    model.config.mean, model.config.std = MEAN, STD
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def openrlhf_proxy(checkpoint: Path, normalize: bool) -> Any:
    """OpenRLHF's serve_rm ``RewardModelProxy`` on its own RewardModel, in float32."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    # get_llm_for_sequence_regression(model_type="reward"), without LoRA, 4-bit or ZeRO-3:
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    config.normalize_reward = normalize
    config._attn_implementation = "eager"
    value_head_prefix = getattr(config, "value_head_prefix", "score")
    base_class = AutoModel._model_mapping[type(config)]
    cls = _reward_model_class(base_class.__base__, base_class, value_head_prefix)
    model = cls.from_pretrained(checkpoint, config=config, trust_remote_code=True, torch_dtype=torch.float32)
    model.config.use_cache = False
    # RewardModel.__init__ writes config.json's mean/std into non-persistent buffers; transformers 5.25's
    # from_pretrained materialises those buffers after __init__ without the values (they come back as
    # uninitialised memory, so --reward.normalize_enable divides by garbage). Written again as __init__
    # writes them, so the reference is what the published code means to compute.
    if hasattr(config, "mean"):
        model.mean[0] = config.mean
        model.std[0] = config.std
    model.eval()
    get_tokenizer = published_function("openrlhf/utils.py", "get_tokenizer", {"AutoTokenizer": AutoTokenizer})
    namespace = {"torch": torch, "logger": logging.getLogger("openrlhf.serve_rm")}
    proxy_class = published_function("openrlhf/serve_rm.py", "RewardModelProxy", namespace)
    proxy = proxy_class.__new__(proxy_class)  # __init__ loads through the functions above, with deepspeed
    proxy.reward_model = model
    proxy.tokenizer = get_tokenizer(str(checkpoint), model, "left", None, use_fast=True)
    proxy.max_length = 2048  # serve_rm's --data.max_len default
    proxy.batch_size = None
    return proxy


def queries(tokenizer: Any) -> list[str]:
    """What OpenRLHF's PPO posts: each sample rendered by the policy's chat template, as text."""
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]


@pytest.fixture(scope="module")
def openrlhf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("openrlhf")
    checkpoint = openrlhf_checkpoint(root / "checkpoint")
    raw, normalized = root / "raw", root / "normalized"
    export_bundle(checkpoint, raw, name="openrlhf-rm", max_length=256)
    normalize = HeadRequest(normalize=True)
    export_bundle(checkpoint, normalized, name="openrlhf-rm-norm", max_length=256, head=normalize)
    return {"checkpoint": checkpoint, "raw": raw, "normalized": normalized}


def test_an_openrlhf_reward_model_exports_its_value_head_as_the_lean_graph_and_says_so(
    openrlhf: dict[str, Path],
) -> None:
    saved = json.loads((openrlhf["checkpoint"] / "config.json").read_text())
    assert saved["architectures"] == ["RewardModel"] and saved["value_head_prefix"] == "value_head"
    raw, normalized = read_manifest(openrlhf["raw"]), read_manifest(openrlhf["normalized"])
    assert raw.architecture == "RewardModel" and raw.graph == "lean"
    assert raw.head == {"form": "value_head", "weights": "value_head"}
    assert normalized.head == {
        "form": "value_head",
        "weights": "value_head",
        "normalize": {"mean": MEAN, "std": STD},
    }
    assert raw.version != normalized.version


@pytest.mark.parametrize("which", ["raw", "normalized"])
def test_get_reward_answers_what_openrlhfs_own_serve_rm_answers_raw_and_normalized(
    openrlhf: dict[str, Path], which: str, tmp_path: Path
) -> None:
    proxy = openrlhf_proxy(openrlhf["checkpoint"], normalize=which == "normalized")
    posted = queries(proxy.tokenizer) + ["Sure, here is how."]
    expected = proxy.get_reward(posted)
    # The token ids: serve_rm's tokenize_fn (add_special_tokens=False), unpadded, against rmserve's.
    theirs = [
        [t for t, m in zip(ids, mask, strict=True) if m]
        for ids, mask in zip(*proxy.tokenize_fn(posted, "cpu").values(), strict=True)
    ]
    bundle = load_bundle(openrlhf[which])
    formatter = Formatter(bundle)
    items, _ = query_items(posted, None, formatter, 100_000)
    assert [list(e.ids) for e in formatter.encode(items)] == theirs
    with serve({"RMSERVE_MODELS": str(openrlhf[which]), "RMSERVE_CACHE": "off", **FP32}, tmp_path) as server:
        body = httpx.post(server.url + "/get_reward", json={"query": posted}, timeout=120).json()
    assert body["rewards"] == pytest.approx(expected, abs=1e-4)
    assert body["scores"] == body["rewards"]
    if which == "normalized":
        raw = openrlhf_proxy(openrlhf["checkpoint"], normalize=False).get_reward(posted)
        assert body["rewards"] == pytest.approx([(r - MEAN) / STD for r in raw], abs=1e-4)
        assert body["rewards"] != pytest.approx(raw, abs=1e-2)


def test_normalize_without_mean_and_std_in_the_config_fails_naming_them(tmp_path: Path) -> None:
    checkpoint = openrlhf_checkpoint(tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    del config["mean"], config["std"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="mean and std in config.json"):
        export_bundle(checkpoint, tmp_path / "bundle", head=HeadRequest(normalize=True))
    assert not (tmp_path / "bundle").exists()


def test_a_value_head_prefix_naming_no_saved_weight_fails_the_export_instead_of_a_random_head(
    tmp_path: Path,
) -> None:
    checkpoint = openrlhf_checkpoint(tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    config["value_head_prefix"] = "score"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="value_head.weight"):
        export_bundle(checkpoint, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_value_head_names_the_head_of_a_checkpoint_whose_config_does_not_as_serve_rms_flag_does(
    tmp_path: Path,
) -> None:
    # OpenRLHF checkpoints saved before train_rm wrote value_head_prefix into config.json are served
    # with serve_rm's --ds.value_head_prefix; rmserve export takes --value-head.
    from rmserve.models.export_command import main

    checkpoint = openrlhf_checkpoint(tmp_path / "checkpoint", prefix="v_head", seed=1)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["value_head_prefix"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ExportError, match="neither its LlamaModel body's nor its 'score' head's: v_head.weight"
    ):
        export_bundle(checkpoint, tmp_path / "refused")
    assert (
        main([str(checkpoint), str(tmp_path / "bundle"), "--value-head", "v_head", "--max-length", "256"])
        == 0
    )
    assert read_manifest(tmp_path / "bundle").head == {"form": "value_head", "weights": "v_head"}

    from transformers import AutoModel, LlamaConfig

    config_obj = LlamaConfig.from_pretrained(checkpoint)
    config_obj.normalize_reward = False
    cls = _reward_model_class(
        AutoModel._model_mapping[LlamaConfig].__base__, AutoModel._model_mapping[LlamaConfig], "v_head"
    )
    model = cls.from_pretrained(checkpoint, config=config_obj, torch_dtype=torch.float32).eval()
    tokenizer = llama3_tokenizer()
    texts = queries(tokenizer)
    bundle = load_bundle(tmp_path / "bundle")
    formatter = Formatter(bundle)
    items, _ = query_items(texts, None, formatter, 100_000)
    with serve(
        {"RMSERVE_MODELS": str(tmp_path / "bundle"), "RMSERVE_CACHE": "off", **FP32}, tmp_path
    ) as server:
        body = httpx.post(server.url + "/get_reward", json={"query": texts}, timeout=120).json()
    expected = []
    for enc in formatter.encode(items):
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            expected.append(model(ids, torch.ones_like(ids)).item())
    assert body["rewards"] == pytest.approx(expected, abs=1e-4)


def test_rmserve_export_normalize_writes_the_configs_mean_and_std_into_the_manifest(
    openrlhf: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rmserve.models.export_command import main

    assert main([str(openrlhf["checkpoint"]), str(tmp_path / "b"), "--normalize", "--max-length", "256"]) == 0
    assert "exported" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "b")
    assert manifest.head is not None and manifest.head["normalize"] == {"mean": MEAN, "std": STD}
    # The same graph as the fixture's normalised export: one bundle version for one checkpoint and flag.
    assert manifest.version == read_manifest(openrlhf["normalized"]).version
