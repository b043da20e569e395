"""Process reward models served as their authors score them: each replica's published usage snippet,
run on a tiny random-weight replica with the model's real tokenizer settings, against what rmserve
serves over HTTP (fp32 within 1e-4, the same number of steps)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from rmserve.bundle import load_bundle
from rmserve.errors import InvalidItem
from rmserve.formatting import Formatter
from rmserve.items import StepsItem, TextItem
from rmserve.kinds import kind_of
from rmserve.layouts import JointLayout
from rmserve.models.export import export_bundle
from rmserve.models.process_heads import StepExport
from tests.support import prm_replicas as rep
from tests.support.server import ServerProcess, serve

REPLICAS = Path(__file__).resolve().parent / "replicas"
TRL = REPLICAS / "trl_prm"
TOLERANCE = 1e-4


def _encoder(bundle: Path) -> Any:
    b = load_bundle(bundle)
    return kind_of("t", b, Formatter(b))


def _served(server: ServerProcess, model: str, items: list[dict[str, Any]]) -> list[list[float]]:
    r = httpx.post(f"{server.url}/v1/score", json={"model": model, "items": items}, timeout=60)
    assert r.status_code == 200, r.text
    return [list(s) for s in r.json()["step_scores"]]


def _close(served: list[list[float]], reference: list[list[float]]) -> None:
    assert [len(s) for s in served] == [len(r) for r in reference]
    for s, r in zip(served, reference, strict=True):
        assert s == pytest.approx(r, abs=TOLERANCE)


# -- the replicas and their authors' usage -------------------------------------------------------------


def _trl_rows() -> list[dict[str, Any]]:
    return list(json.loads((TRL / "tokenize_row.json").read_text())["rows"])


def _trl_reference(rule: str) -> list[list[float]]:
    """ProcessBench's TRL evaluation (QwenLM/ProcessBench ``code/run_eval_prm_trl.py``): the token
    classifier on TRL's ids, read at each step's last token; p(+) or, for PURE (jinachris/PURE-PRM-7B
    card), p(+) - p(-)."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(TRL / "checkpoint", dtype=torch.float32).eval()
    out = []
    for row in _trl_rows():
        with torch.no_grad():
            probs = model(torch.tensor([row["input_ids"]])).logits[0].softmax(-1)
        at = [k for k, label in enumerate(row["labels"]) if label != -100]
        values = probs[at, 1] - (probs[at, 0] if rule == "prob_diff" else 0)
        out.append([float(v) for v in values])
    return out


MATH_SHEPHERD = {
    "question": "What is 7 times 3, minus 7?",
    "output": "Step 1: multiply 3 by 7: 21 ки\nStep 2: 21 - 7 = 14. ки\nStep 3: So the answer is 14! ки",
}


def _math_shepherd(root: Path) -> Path:
    return rep.causal_lm("mistral", rep.mistral_tokenizer(), root / "ms-checkpoint", seed=1)


def _math_shepherd_reference(checkpoint: Path) -> list[list[float]]:
    """The Math-Shepherd card's snippet (peiyi9979/math-shepherd-mistral-7b-prm), as written there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    good_token, bad_token, step_tag = "+", "-", "ки"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    candidate_tokens = tokenizer.encode(f"{good_token} {bad_token}")[1:]
    step_tag_id = tokenizer.encode(f"{step_tag}")[-1]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    input_for_prm = f"{MATH_SHEPHERD['question']} {MATH_SHEPHERD['output']}"
    input_id = torch.tensor([tokenizer.encode(input_for_prm)])
    with torch.no_grad():
        logits = model(input_id).logits[:, :, candidate_tokens]
        scores = logits.softmax(dim=-1)[:, :, 0]
        step_scores = scores[input_id == step_tag_id]
    return [[float(s) for s in step_scores]]


RLHFLOW = {"prompt": "What is 3 + 5?", "steps": ["We add 3 and 5 to get 8.", "So the answer is 8!", "Yes."]}


def _rlhflow(root: Path) -> Path:
    return rep.causal_lm("llama", rep.llama3_tokenizer(), root / "rlhflow-checkpoint", seed=2)


def _rlhflow_reference(checkpoint: Path) -> list[list[float]]:
    """RLHFlow/RLHF-Reward-Modeling ``math-rm/prm_evaluate.py`` ``select_sample``: one forward pass per
    step over the conversation so far, read at position -3 (where the model predicts the ``+``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    candidate_tokens = [tokenizer.encode("+")[-1], tokenizer.encode("-")[-1]]
    conversation: list[dict[str, str]] = []
    single_step_score = []
    for k, step in enumerate(RLHFLOW["steps"]):
        text = RLHFLOW["prompt"] + " " + step if k == 0 else step
        conversation.append({"content": text, "role": "user"})
        conversation.append({"content": "+", "role": "assistant"})
        rendered = tokenizer.apply_chat_template(conversation, return_tensors="pt")
        input_ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
        with torch.no_grad():
            logits = model(input_ids).logits[:, -3, candidate_tokens]
            scores = logits.softmax(dim=-1)[:, 0]
        single_step_score.append(float(scores[0]))
    return [single_step_score]


SKYWORK = {"problem": "What is 3 + 5?", "response": "We add 3 and 5 to get 8.\nSo the answer is 8!\nYes."}


def _skywork(root: Path) -> Path:
    """Skywork-o1-Open-PRM's checkpoint layout (what its ``PRM_MODEL.state_dict`` saves): a Qwen2 causal
    LM's weights and ``v_head.summary.*``, config.json naming ``Qwen2ForPrmModel``; a BOS token set, as
    its ``prepare_input`` writes ``tokenizer.bos_token`` before the problem (which one the real tokenizer
    names is not verified here)."""
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(3)
    tokenizer = rep.qwen2_tokenizer(bos="<|endoftext|>")
    lm = Qwen2ForCausalLM(rep.tiny_config("qwen2", tokenizer))
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.5)
    weights = {k: v.contiguous() for k, v in lm.state_dict().items()}
    weights |= {f"v_head.summary.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    out = root / "skywork-checkpoint"
    out.mkdir()
    lm.config.architectures = ["Qwen2ForPrmModel"]
    lm.config.save_pretrained(out)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return out


def _skywork_reference(checkpoint: Path) -> list[list[float]]:
    """SkyworkAI/skywork-o1-prm-inference README's Hugging Face usage, with its published code
    (tests/replicas/skywork_o1, verbatim): ``prepare_input`` with ``step_token="\\n"``, ``PRM_MODEL``
    with ``return_probs=True``, ``derive_step_rewards``."""
    from transformers import AutoTokenizer

    from tests.replicas.skywork_o1.io_utils import (
        derive_step_rewards,
        prepare_batch_input_for_model,
        prepare_input,
    )
    from tests.replicas.skywork_o1.prm_model import PRM_MODEL

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processed = [prepare_input(SKYWORK["problem"], SKYWORK["response"], tokenizer=tokenizer, step_token="\n")]
    input_ids, steps, reward_flags = zip(*processed, strict=True)
    model = PRM_MODEL.from_pretrained(str(checkpoint)).eval()
    input_ids, attention_mask, reward_flags = prepare_batch_input_for_model(
        input_ids, reward_flags, tokenizer.pad_token_id
    )
    with torch.no_grad():
        _, _, rewards = model(input_ids=input_ids, attention_mask=attention_mask, return_probs=True)
    return [[float(r) for r in row] for row in derive_step_rewards(rewards, reward_flags)]


# -- bundles and one server for all of them -------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replicas")
    sep = StepExport("\n", layout="separate")
    shepherd, rlhflow, skywork = _math_shepherd(root), _rlhflow(root), _skywork(root)
    # Skywork-o1: steps tokenized apart, "\n" after the problem and each step, BOS first, value head.
    export_bundle(
        skywork,
        root / "skywork",
        name="skywork",
        step=StepExport("\n", layout="separate", prompt_suffix="\n"),
    )
    export_bundle(TRL / "checkpoint", root / "trl", name="trl", step=sep)
    pure = StepExport("\n", "prob_diff", layout="separate")  # PURE's rule: p(+) - p(-)
    export_bundle(TRL / "checkpoint", root / "pure", name="pure", step=pure)
    shepherd_step = StepExport("ки", label_tokens=("+", "-"), before_token=" ", between_steps="\n")
    export_bundle(
        shepherd, root / "math-shepherd", step=shepherd_step, input_format="plain", bos_tokens=1, name="ms"
    )
    turns = StepExport("+", label_tokens=("+", "-"), layout="turns", prompt_suffix=" ")
    export_bundle(rlhflow, root / "rlhflow-bundle", name="rlhflow", step=turns)
    return {
        "trl": root / "trl",
        "pure": root / "pure",
        "math-shepherd": root / "math-shepherd",
        "rlhflow": root / "rlhflow-bundle",
        "math-shepherd-checkpoint": shepherd,
        "rlhflow-checkpoint": rlhflow,
        "skywork": root / "skywork",
        "skywork-checkpoint": skywork,
    }


@pytest.fixture(scope="module")
def server(replicas: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    names = ("trl", "pure", "math-shepherd", "rlhflow", "skywork")
    env = {
        "RMSERVE_MODELS": ",".join(f"{n}={replicas[n]}" for n in names),
        "RMSERVE_PRECISION": "fp32",
        "RMSERVE_CACHE": "off",
    }
    with serve(env, tmp_path_factory.mktemp("layouts-server")) as running:
        yield running


# -- the tests ---------------------------------------------------------------------------------------------


def test_the_qwen2_replica_tokenizer_really_merges_the_newline_with_the_punctuation_before_it() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TRL / "checkpoint")
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    for text in ("So the answer is 8!\n", "We add 3 and 5 to get 8.\n"):
        assert newline[0] not in tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(("model", "rule"), [("trl", "positive_prob"), ("pure", "prob_diff")])
def test_a_prm_trained_by_trls_prmtrainer_serves_its_step_scores_on_trls_own_tokenization(
    replicas: dict[str, Path], server: ServerProcess, model: str, rule: str
) -> None:
    rows = _trl_rows()
    items = [StepsItem(r["prompt"], tuple(r["completions"])) for r in rows]
    for encoded, row in zip(_encoder(replicas[model]).encode(items), rows, strict=True):
        # The ids are TRL's tokenize_row's (recorded by tests/replicas/trl_prm/train.py under TRL 1.13.0).
        assert list(encoded.ids) == row["input_ids"]
        assert list(encoded.positions) == [k for k, label in enumerate(row["labels"]) if label != -100]
    served = _served(server, model, [{"prompt": r["prompt"], "steps": r["completions"]} for r in rows])
    _close(served, _trl_reference(rule))


def test_a_tokenizer_that_merges_the_separator_still_gives_one_score_per_step_and_joint_text_names_counts(
    replicas: dict[str, Path], server: ServerProcess
) -> None:
    steps = ["We add 3 and 5 to get 8.", "So the answer is 8!", "Then 7 * 12 = 84.", "Yes."]
    served = _served(server, "trl", [{"prompt": "What is 3 + 5?", "steps": steps}])
    assert len(served[0]) == 4
    # The same solution laid out jointly with "\n" as the step token: the tokenizer reads ".\n" and "!\n"
    # as single tokens, so the markers do not match the steps, and the item is refused naming both counts.
    bundle = load_bundle(replicas["trl"])
    assert bundle.manifest.process is not None
    joint = JointLayout(Formatter(bundle), bundle.manifest.process.model_copy(update={"layout": "joint"}))
    text = "What is 3 + 5?" + "".join(s + "\n" for s in steps)
    with pytest.raises(InvalidItem, match="marks 4 steps with .* but the tokenizer reads 0 of them"):
        joint.lay([TextItem(text)])
    with pytest.raises(InvalidItem, match="once after each of its 4 steps .* it appears nowhere"):
        joint.lay([StepsItem("What is 3 + 5?", tuple(steps))])


def test_a_text_item_on_a_separate_layout_bundle_is_a_422_asking_for_prompt_and_steps(
    server: ServerProcess,
) -> None:
    r = httpx.post(
        f"{server.url}/v1/score", json={"model": "trl", "items": [{"text": "a.\nb.\n"}]}, timeout=60
    )
    assert r.status_code == 422 and "send prompt and steps" in r.text


def test_math_shepherd_scores_as_its_card_does_without_the_client_writing_the_bos(
    replicas: dict[str, Path], server: ServerProcess
) -> None:
    text = f"{MATH_SHEPHERD['question']} {MATH_SHEPHERD['output']}"
    encoded = _encoder(replicas["math-shepherd"]).encode([TextItem(text)])[0]
    bos = load_bundle(replicas["math-shepherd"]).manifest.format
    assert bos.bos_tokens == 1 and encoded.ids[0] == 1  # <s>, once
    # A client that writes "<s> " itself, as the card's users did to work around a missing BOS, gets the same.
    again = _encoder(replicas["math-shepherd"]).encode([TextItem("<s> " + text)])[0]
    assert again.ids == encoded.ids
    served = _served(server, "math-shepherd", [{"text": text}])
    _close(served, _math_shepherd_reference(replicas["math-shepherd-checkpoint"]))


def test_rlhflow_reads_each_step_as_a_user_turn_where_the_model_predicts_its_label_in_one_pass(
    replicas: dict[str, Path], server: ServerProcess
) -> None:
    served = _served(server, "rlhflow", [RLHFLOW])
    _close(served, _rlhflow_reference(replicas["rlhflow-checkpoint"]))
    manifest = load_bundle(replicas["rlhflow"]).manifest
    assert manifest.process is not None and manifest.process.layout == "turns"


def test_skywork_o1_open_prm_scores_through_its_value_head_as_its_published_code_does(
    replicas: dict[str, Path], server: ServerProcess
) -> None:
    manifest = load_bundle(replicas["skywork"]).manifest
    assert manifest.process is not None
    assert (manifest.process.head, manifest.process.rule, manifest.process.layout) == (
        "value_head",
        "sigmoid",
        "separate",
    )
    assert manifest.format.bos_tokens == 1
    steps = SKYWORK["response"].split("\n")
    served = _served(server, "skywork", [{"prompt": SKYWORK["problem"], "steps": steps}])
    _close(served, _skywork_reference(replicas["skywork-checkpoint"]))


def test_an_implicit_prm_is_refused_by_name_at_export(tmp_path: Path) -> None:
    """EurusPRM's checkpoint is a plain Qwen2 causal LM: read at "+"/"-" it would export and score
    nonsense, so export refuses it by its name (models/families/process.py)."""
    from rmserve.models.graph import ExportError

    checkpoint = rep.causal_lm("qwen2", rep.qwen2_tokenizer(), tmp_path / "EurusPRM-Stage2")
    with pytest.raises(ExportError, match="EurusPRM .* is not supported: an implicit PRM"):
        export_bundle(checkpoint, tmp_path / "bundle", step=StepExport("+", label_tokens=("+", "-")))


def test_docs_list_every_process_family_with_its_status_and_flags() -> None:
    from rmserve.models.families.process import PROCESS_FAMILIES

    docs = (Path(__file__).resolve().parents[1] / "docs" / "process.md").read_text()
    table = docs[docs.index("## Published PRMs") : docs.index("## How a step is marked")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(PROCESS_FAMILIES)
    for family, row in zip(PROCESS_FAMILIES, rows, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == family.layout
        assert ("refused" in cells[3]) == (family.status == "refused")


def test_a_long_prompt_in_the_separate_layout_loses_its_oldest_tokens_and_keeps_every_step(
    replicas: dict[str, Path], server: ServerProcess
) -> None:
    from rmserve.errors import ItemTooLong

    kind = _encoder(replicas["trl"])
    limit = load_bundle(replicas["trl"]).manifest.format.max_length
    steps = ("We add 3 and 5 to get 8.", "So the answer is 8!")
    item = StepsItem("Then 7 * 12 = 84. " * 200, steps)
    whole = kind.encode([StepsItem("Then 7 * 12 = 84.", steps)])[0]
    cut = kind.encode([item])[0]
    assert cut.truncated and len(cut.ids) == limit and len(cut.positions) == 2
    # The steps' ids, separators included, are the short item's: only prompt tokens left.
    prompt = Formatter(load_bundle(replicas["trl"])).tokenize(["Then 7 * 12 = 84."])[0]
    tail = len(whole.ids) - len(prompt.ids)
    assert cut.ids[-tail:] == whole.ids[-tail:] and cut.positions[-1] == limit - 1
    with pytest.raises(ItemTooLong):
        kind.encode([item], strict=True)
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
    described = {m["id"]: m for m in models["data"]}
    assert described["trl"]["step_layout"] == "separate" and described["rlhflow"]["step_layout"] == "turns"


def test_processbench_eval_of_a_prob_diff_model_takes_the_threshold_0_by_default(
    replicas: dict[str, Path], tmp_path: Path
) -> None:
    from rmserve.models.eval.command import main

    rows = [{"problem": r["prompt"], "steps": r["completions"], "label": -1} for r in _trl_rows()]
    data = tmp_path / "processbench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main([str(data), "--bundle", str(replicas["pure"]), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["processbench"]["threshold"] == 0.0
