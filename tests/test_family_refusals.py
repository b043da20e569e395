"""What export refuses, with the reason and nothing left behind; and the BOS policy, template environment and
default length every family relies on."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from rmserve.bundle import Bundle, load_bundle
from rmserve.chat import ChatTemplate
from rmserve.formatting import Formatter
from rmserve.items import ChatItem, Message, PairItem, TextItem
from rmserve.models.export import ExportError, export_bundle
from rmserve.models.export_command import main as export_main
from rmserve.models.formats import default_max_length
from tests.support.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("llama") / "checkpoint")


@pytest.fixture(scope="module")
def llama_bundle(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(llama, bundle)
    return bundle


def copy_of(checkpoint: Path, tmp: Path) -> Path:
    out = tmp / "copy"
    out.mkdir()
    for f in checkpoint.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def edit_config(checkpoint: Path, **fields: Any) -> None:
    path = checkpoint / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def with_weights(checkpoint: Path, tmp: Path, edit: Any) -> Path:
    """A copy of ``checkpoint`` whose safetensors weights ``edit`` (a dict -> None) changed."""
    out = copy_of(checkpoint, tmp)
    weights = load_file(out / "model.safetensors")
    edit(weights)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def refused(checkpoint: Path, tmp: Path, **options: Any) -> str:
    """The export's error message; checks that neither the bundle nor a staging directory is left."""
    dest = tmp / "out" / "bundle"
    with pytest.raises(ExportError) as caught:
        export_bundle(checkpoint, dest, **options)
    assert not dest.exists()
    assert not list((tmp / "out").glob(".*export-*")) if (tmp / "out").exists() else True
    return str(caught.value)


def test_a_checkpoint_without_its_score_weight_fails_the_export_instead_of_serving_a_random_head(
    llama: Path, tmp_path: Path
) -> None:
    ck = with_weights(llama, tmp_path, lambda w: w.pop("score.weight"))
    message = refused(ck, tmp_path)
    assert "score.weight" in message and "missing" in message


def test_a_head_the_stock_class_cannot_express_fails_the_export_naming_its_weights(
    llama: Path, tmp_path: Path
) -> None:
    ck = with_weights(llama, tmp_path, lambda w: w.update({"value_head.weight": w["score.weight"].clone()}))
    message = refused(ck, tmp_path)
    assert "value_head.weight" in message and "not used" in message


def test_remote_code_without_the_flag_is_refused_naming_the_classes_it_would_run(
    llama: Path, tmp_path: Path
) -> None:
    ck = copy_of(llama, tmp_path)
    remote = {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}
    edit_config(ck, architectures=["LlamaForRewardModelWithGating"], auto_map=remote)
    message = refused(ck, tmp_path)
    assert "--trust-remote-code" in message and "LlamaForRewardModelWithGating" in message


def test_a_class_no_family_knows_is_refused_by_name_not_guessed(llama: Path, tmp_path: Path) -> None:
    ck = copy_of(llama, tmp_path)
    # QRM-Llama3.1's class: no family reads its head (ArmoRM's LlamaForRewardModelWithGating is one).
    edit_config(ck, architectures=["LlamaForRewardModelWithGating31"])
    message = refused(ck, tmp_path)
    assert "LlamaForRewardModelWithGating31" in message and "docs/models.md" in message


def test_a_declared_class_other_than_the_one_transformers_builds_fails_the_export(
    llama: Path, tmp_path: Path
) -> None:
    ck = copy_of(llama, tmp_path)
    edit_config(ck, architectures=["MistralForSequenceClassification"])
    message = refused(ck, tmp_path)
    assert "MistralForSequenceClassification" in message and "LlamaForSequenceClassification" in message


def test_an_unknown_family_name_is_refused_listing_the_families(llama: Path, tmp_path: Path) -> None:
    message = refused(llama, tmp_path, family="armorm-guess")
    assert "armorm-guess" in message and "skywork-reward-v2" in message


@pytest.mark.parametrize("damage", ["corrupt weights", "no config", "no tokenizer"])
def test_a_damaged_checkpoint_fails_the_export_naming_what_is_wrong(
    llama: Path, tmp_path: Path, damage: str
) -> None:
    ck = copy_of(llama, tmp_path)
    if damage == "corrupt weights":
        (ck / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
        expected = "weights"
    elif damage == "no config":
        (ck / "config.json").unlink()
        expected = "config.json"
    else:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (ck / f).unlink()
        expected = "tokenizer"
    assert expected in refused(ck, tmp_path)


def test_the_command_exits_non_zero_and_names_the_missing_weight(llama: Path, tmp_path: Path) -> None:
    ck = with_weights(llama, tmp_path, lambda w: w.pop("score.weight"))
    assert export_main([str(ck), str(tmp_path / "b")]) == 1
    assert not (tmp_path / "b").exists()


def test_bos_tokens_overrides_the_reference_and_reaches_every_kind_of_item(
    llama: Path, tmp_path: Path
) -> None:
    assert export_main([str(llama), str(tmp_path / "b"), "--bos-tokens", "2"]) == 0
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest.format.bos_tokens == 2
    assert bundle.manifest.parity["reference"]["bos_decided_by"] == "--bos-tokens"
    assert bundle.manifest.parity["reference"]["token_ids"] == "identical"
    formatter = Formatter(bundle)
    bos = formatter.tokenizer.token_to_id("<s>")
    chat = (Message("user", "Can you help me?"), Message("assistant", "Sure, here is how."))
    items = [
        TextItem("<s><s><s>Human: Can you help me?"),  # three of them: still exactly two
        TextItem("A user explains the recipe for bread."),  # none: two are added
        PairItem("Can you help me?", "Sure, here is how."),
        ChatItem(chat),
    ]
    for enc in formatter.encode(items):
        assert enc.ids[:2] == (bos, bos) and enc.ids[2] != bos


def test_without_a_bos_policy_the_text_tokenizes_as_it_always_did(llama_bundle: Path) -> None:
    bundle = load_bundle(llama_bundle)
    assert bundle.manifest.format.bos_tokens is None
    formatter = Formatter(bundle)
    plain = formatter.tokenizer.encode("<s><s>Human: hi", add_special_tokens=False).ids
    assert formatter.encode([TextItem("<s><s>Human: hi")])[0].ids == tuple(plain)


def test_a_bos_policy_keeps_its_bos_tokens_when_an_item_is_truncated(llama_bundle: Path) -> None:
    bundle = load_bundle(llama_bundle)
    fmt = bundle.manifest.format.model_copy(update={"bos_tokens": 2, "max_length": 16})
    formatter = Formatter(Bundle(bundle.path, bundle.manifest.model_copy(update={"format": fmt})))
    bos = formatter.tokenizer.token_to_id("<s>")
    enc = formatter.encode([TextItem("The teacher explains the history of Rome, briefly. " * 4)])[0]
    assert enc.truncated and len(enc.ids) == 16 and enc.ids[:2] == (bos, bos) and enc.ids[2] != bos


def test_templates_see_the_pinned_date_the_tools_and_generation_blocks() -> None:
    source = (
        "{{ strftime_now('%d %b %Y') }}|{% for t in tools %}{{ t.function.name }}{% endfor %}|"
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    )
    template = ChatTemplate(source, bos_token=None, eos_token=None, template_date="2026-12-07")
    tools = ({"type": "function", "function": {"name": "get_weather"}},)
    assert template.render((Message("user", "hi"),), tools) == "07 Dec 2026|get_weather|hi"


def test_a_template_without_a_pinned_date_sees_no_strftime_now_as_before() -> None:
    source = "{% if strftime_now is defined %}dated{% else %}26 Jul 2024{% endif %}"
    template = ChatTemplate(source, bos_token=None, eos_token=None)
    assert template.render((Message("user", "x"),)) == "26 Jul 2024"


def test_the_default_max_length_is_the_models_trained_context() -> None:
    meta = SimpleNamespace(family="decoder", max_position_embeddings=131072)
    assert default_max_length(SimpleNamespace(model_max_length=1e30), meta) == 131072  # type: ignore[arg-type]
    assert default_max_length(SimpleNamespace(model_max_length=16384), meta) == 16384  # type: ignore[arg-type]
    none = SimpleNamespace(family="decoder", max_position_embeddings=None)
    assert default_max_length(SimpleNamespace(model_max_length=1e30), none) == 4096  # type: ignore[arg-type]


def test_docs_models_md_has_a_row_for_every_registered_family() -> None:
    from rmserve.models.families import families

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    assert {f.name for f in families()} <= rows


def test_a_conversation_the_authors_template_refuses_is_refused_by_the_server_too(
    llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    ck = copy_of(llama, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(ck)
    # Gemma-2's rule (its template raises on a system turn), on the tiny template.
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + tokenizer.chat_template
    )
    tokenizer.save_pretrained(ck)
    manifest = export_bundle(ck, tmp_path / "b")
    ref = manifest.parity["reference"]
    assert "System role not supported" in ref["not_compared"]["system turn"]
    assert ref["token_ids"] == "identical" and "system turn" not in ref["conversations"]


def test_a_refused_conversation_the_server_scores_fails_unless_only_its_tool_fallback_renders_it(
    llama: Path, llama_bundle: Path
) -> None:
    from dataclasses import replace

    from transformers import AutoTokenizer

    from rmserve.engines.onnxruntime import OnnxRuntimeEngine
    from rmserve.models import authors
    from rmserve.models.families import families

    bundle = load_bundle(llama_bundle)
    family = next(f for f in families() if f.name == bundle.manifest.model_family["name"])
    run = authors.run_reference(
        llama,
        family,
        AutoTokenizer.from_pretrained(llama),
        max_length=bundle.manifest.format.max_length,
        trust_remote_code=False,
        date=bundle.manifest.format.template_date,
        bos_override=None,
    )
    # As if the authors' template refused a plain conversation and the tool call (whose call the tiny
    # template does not render, so the server writes it by its fallback).
    refused = {"several turns": "refused: a", "tool call": "refused: b"}
    keep = [k for k, c in enumerate(run.reference.conversations) if c.name not in refused]
    kept = replace(authors._only(run.reference, keep), refused=refused)
    engine = OnnxRuntimeEngine(bundle.model_path, threads=1)
    try:
        result, problems = authors.compare(bundle, engine, replace(run, reference=kept), 1e-4)
    finally:
        engine.close()
    assert problems == ["the authors' template refuses 'several turns', but the server scores it"]
    assert result["not_compared"]["tool call"].startswith("refused: b; the server scores it by its fallback")
