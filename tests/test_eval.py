"""``rmserve eval``: real parts throughout.

The mechanics (file formats, row shapes, bad rows, resume, server parity) run on a small real ONNX
reward model built here in about a second (byte-level BPE tokenizer, embeddings, a tanh layer,
masked mean pooling, a linear head), scored by ONNX Runtime through the server's own Formatter and
engine. It stands in for ``tiny_bundles`` (torch export of three architectures, minutes on this
shared 2-core machine) only to keep this file inside its time budget. The accuracy and parity
assertions on ``../shared/data`` use the shipped default bundle when it is present.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rmserve.bundle import FormatSettings, default_bundle_path, write_manifest
from rmserve.models.eval import render
from rmserve.models.eval.command import main
from rmserve.models.eval.render import zero_edged_bins
from rmserve.models.eval.scorers import served_entry
from rmserve.models.eval.summary import outcome, rewardbench_v1, rewardbench_v2
from tests.support.server import REPO, serve
from tests.support.tiny import corpus

SHARED_FILES = ("hh-rlhf/dev.jsonl.gz", "pandalm/test.jsonl", "oasst/pairs.jsonl")


# ------------------------------------------------------------------ a small real bundle


def build_small_bundle(directory: Path, *, dim: int = 16, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.save(str(directory / "tokenizer.json"))

    rng = np.random.default_rng(seed)
    vocab = tok.get_vocab_size()
    weights = [
        numpy_helper.from_array(a.astype(np.float32), name)
        for name, a in (
            ("emb", rng.normal(0, 1, (vocab, dim))),
            ("types", rng.normal(0, 1, (2, dim))),
            ("w1", rng.normal(0, 0.5, (dim, dim))),
            ("w2", rng.normal(0, 1, (dim, 1))),
        )
    ]
    weights += [
        numpy_helper.from_array(np.array(v, dtype=np.int64), n)
        for n, v in (("axis1", [1]), ("axis2", [2]), ("flat", [-1]))
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["typ"]),
        helper.make_node("Add", ["tok", "typ"], ["x"]),
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Tanh", ["h0"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["h", "mask3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "w2"], ["logit"]),
        helper.make_node("Reshape", ["logit", "flat"], ["scores"]),
    ]
    ids = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    out = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch"])]
    graph = helper.make_graph(nodes, "small-rm", ids, out, initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    write_manifest(
        directory,
        name="small-test-rm",
        architecture="MeanPoolReward",
        model_type="test",
        family="encoder",
        base_model="none (random, built in tests/test_eval.py)",
        opset=18,
        inputs=["input_ids", "attention_mask", "token_type_ids"],
        format=FormatSettings(input_format="text_pair", max_length=96, pooling="mean", pad_token_id=0),
    )
    return directory


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_bundle(tmp_path_factory.mktemp("small") / "bundle")


@pytest.fixture(scope="module")
def default_bundle() -> Path:
    path = default_bundle_path()
    if not (path / "manifest.json").is_file():
        pytest.skip(
            f"the default bundle is not at {path} yet (it is being trained): real-data accuracy tests skipped"
        )
    return path


# ------------------------------------------------------------------ helpers


def eval_run(*args: Any) -> int:
    return main([str(a) for a in args] + ["--no-progress"])


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def by_key(out: Path) -> dict[str, dict[str, Any]]:
    recs = records(out)
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)), "a row was scored twice"
    return {r["key"]: r for r in recs}


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def pair_accuracy(recs: list[dict[str, Any]]) -> float:
    pairs = [r for r in recs if r.get("kind") == "pair"]
    return sum(r["scores"][0] > r["scores"][1] for r in pairs) / len(pairs)


def synthetic_pairs(n: int) -> list[dict[str, Any]]:
    s = corpus()  # HH-formatted prompts: the same pair in every shape then reads to the same tokens
    return [
        {
            "prompt": f"\n\nHuman: {s[i % len(s)]}\n\nAssistant:",
            "chosen": s[(7 * i + 3) % len(s)],
            "rejected": s[(11 * i + 5) % len(s)],
            "subset": ("alpha", "beta", "gamma")[i % 3],
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


# ------------------------------------------------------------------ how rows count


def test_outcome_pairs_count_ties_as_wrong_and_best_of_n_splits_credit() -> None:
    pair = {"kind": "pair", "n_chosen": 1}
    assert outcome({**pair, "scores": [1.0, 0.5]}) == (1.0, 0.5, False)
    assert outcome({**pair, "scores": [0.5, 0.5]}) == (0.0, 0.0, True)
    bon = {"kind": "best_of_n", "n_chosen": 1}
    assert outcome({**bon, "scores": [2.0, 1.0, 0.0, 1.5]})[0] == 1.0
    assert outcome({**bon, "scores": [2.0, 2.0, 0.0, 1.0]})[0] == 0.5  # RewardBench-2: 1 / (tied at the top)
    assert outcome({**bon, "scores": [2.0, 2.0, 2.0, 1.0]})[0] == pytest.approx(1 / 3)
    assert outcome({**bon, "scores": [1.0, 2.0, 0.0, 0.0]})[0] == 0.0
    several = {"kind": "best_of_n", "n_chosen": 2}
    assert outcome({**several, "scores": [3.0, 2.0, 1.0]})[0] == 1.0
    assert outcome({**several, "scores": [3.0, 1.0, 1.0]})[0] == 0.0


def test_rewardbench_sections_follow_the_leaderboard_weighting() -> None:
    acc = {
        "alpacaeval-easy": 1.0,
        "mt-bench-easy": 0.0,
        "math-prm": 0.5,
        "hep-go": 1.0,
        "anthropic_helpful": 0.6,
        "shp": 0.8,
        "mine": 0.1,
    }
    rb = rewardbench_v1(acc)
    assert rb is not None
    assert rb["sections"]["Chat"] == pytest.approx(100 / 128)  # weighted by example counts 100 and 28
    assert rb["sections"]["Reasoning"] == pytest.approx((0.5 * 984 + 164) / (984 + 164))
    assert rb["sections"]["Prior Sets (0.5 weight)"] == pytest.approx(0.7)
    expected = (2 * 100 / 128 + 2 * (0.5 * 984 + 164) / 1148 + 0.7) / 5  # weights 2, 2 and 1
    assert rb["score"] == pytest.approx(expected, abs=1e-6)
    assert not rb["complete"] and rb["other_subsets"] == ["mine"] and "Safety" not in rb["sections"]
    assert rewardbench_v1({"helpful-base": 0.7}) is None
    rb2 = rewardbench_v2({"Math": 0.5, "Focus": 1.0})
    assert rb2 is not None and rb2["score"] == 0.75 and not rb2["complete"]


# ------------------------------------------------------------------ formats, shapes, outputs


def test_every_format_and_shape_scores_the_same_rows_alike(small_bundle: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = synthetic_pairs(30)
    texts = [r["prompt"].removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:") for r in rows]
    conversational = [
        {
            "prompt": [{"role": "user", "content": t}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "subset": r["subset"],
        }
        for t, r in zip(texts, rows, strict=True)
    ]
    hh = [
        {
            "chosen": f"{r['prompt']} {r['chosen']}",
            "rejected": f"{r['prompt']} {r['rejected']}",
            "subset": r["subset"],
        }
        for r in rows
    ]
    best_of_n = [
        {
            "id": i,
            "prompt": r["prompt"],
            "chosen": [r["chosen"]],
            "rejected": [r["rejected"], r["prompt"], "ok"],
            "subset": "Focus",
        }
        for i, r in enumerate(rows[:10])
    ]
    plain = [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows[:10]]
    files = [
        write_jsonl(tmp_path / "pairs.jsonl.gz", rows),
        write_jsonl(tmp_path / "conv.jsonl", conversational),
        write_jsonl(tmp_path / "hh.jsonl", hh),
        write_jsonl(tmp_path / "bon.jsonl", best_of_n),
        write_jsonl(tmp_path / "plain.jsonl", plain),
    ]
    (tmp_path / "pairs.json").write_text(json.dumps({"data": rows[:12]}))
    pq.write_table(pa.Table.from_pylist(rows[:12]), tmp_path / "pairs.parquet")
    import csv

    with (tmp_path / "conv.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected", "subset"])
        w.writeheader()
        w.writerows(
            {k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
            for r in conversational[:12]
        )
    Dataset.from_list(rows[:12]).save_to_disk(str(tmp_path / "hf"))
    files += [tmp_path / "pairs.json", tmp_path / "pairs.parquet", tmp_path / "conv.csv", tmp_path / "hf"]

    out = tmp_path / "out"
    assert eval_run(*files, "--bundle", small_bundle, "--out", out, "--chunk-rows", 7) == 0
    s, recs = summary(out), records(out)
    assert s["counts"] == {
        "rows_read": 30 * 3 + 10 + 10 + 12 * 4,
        "rows_scored": 30 * 3 + 10 + 10 + 12 * 4,
        "pairs": 30 * 3 + 12 * 4,
        "best_of_n": 10,
        "plain": 10,
        "over_max_length": 0,
        "bad_rows": 0,
    }
    # The same pair in every file and shape gets the very same scores.
    by_file: dict[str, list[list[float]]] = {}
    for r in recs:
        by_file.setdefault(Path(r["file"]).name, []).append(r["scores"])
    # The same pair in every file and shape gets the same scores (<= 1e-5: batch neighbours differ).
    reference = np.array(by_file["pairs.jsonl.gz"])
    for name in ("conv.jsonl", "hh.jsonl"):
        np.testing.assert_allclose(by_file[name], reference, atol=1e-5, rtol=0)
    for name in ("pairs.json", "pairs.parquet", "conv.csv", "hf"):
        np.testing.assert_allclose(by_file[name], reference[:12], atol=1e-5, rtol=0)
    np.testing.assert_allclose([b[:2] for b in by_file["bon.jsonl"]], reference[:10], atol=1e-5, rtol=0)
    np.testing.assert_allclose([p[0] for p in by_file["plain.jsonl"]], reference[:10, 0], atol=1e-5, rtol=0)
    # The summary's numbers are the per-row scores' numbers.
    prefs = [r for r in recs if r["kind"] != "score"]
    credit = [outcome(r)[0] for r in prefs]
    assert s["accuracy"] == pytest.approx(sum(credit) / len(credit), abs=1e-6)
    alpha = [r for r in recs if r["subset"] == "alpha" and r["kind"] == "pair"]
    assert s["subsets"]["alpha"]["accuracy"] == pytest.approx(pair_accuracy(alpha), abs=1e-6)
    assert s["rewardbench2"]["subsets"]["Focus"] == s["subsets"]["Focus"]["accuracy"]
    assert s["model"]["version"] == json.loads((small_bundle / "manifest.json").read_text())["version"]
    assert s["run"]["items_sent_to_model"] == sum(len(r["scores"]) for r in recs)
    for png in ("scores.png", "margins.png", "accuracy_by_subset.png"):
        assert_png(out / png)
        assert f"]({png})" in (out / "report.md").read_text()
    assert s["plots"] == ["scores.png", "margins.png", "accuracy_by_subset.png"]


def test_bad_rows_are_counted_with_their_lines_and_strict_stops(small_bundle: Path, tmp_path: Path) -> None:
    good = synthetic_pairs(6)
    lines: list[Any] = [
        good[0],
        good[1],
        '{"prompt": "x", "chosen": ',
        good[2],
        "",
        {"prompt": "p", "chosen": "c"},
        ["not", "an", "object"],
        good[3],
        {"prompt": "p", "chosen": ["a"], "rejected": [1, 2]},
        {"foo": 1},
        good[4],
    ]
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text('prompt,chosen,rejected\n"a","b","c"\n"only one field"\n"d","e","f"\n')
    out = tmp_path / "out"
    assert eval_run(data, csv_file, "--bundle", small_bundle, "--out", out) == 0
    s = summary(out)
    bad = {(Path(b["file"]).name, b["line"]) for b in s["bad_rows"]["first"]}
    assert bad == {
        ("bad.jsonl", 3),
        ("bad.jsonl", 6),
        ("bad.jsonl", 7),
        ("bad.jsonl", 9),
        ("bad.jsonl", 10),
        ("bad.csv", 3),
    }
    assert s["counts"]["bad_rows"] == 6 and s["counts"]["rows_scored"] == 5 + 2
    assert s["bad_rows"]["by_file"] == {str(data): 5, str(csv_file): 1}
    assert [f["bad_rows"] for f in s["data"]["files"]] == [5, 1]
    assert len((out / "bad_rows.jsonl").read_text().splitlines()) == 6
    assert "missing 'rejected'" in (out / "report.md").read_text()

    strict_out = tmp_path / "strict"
    assert eval_run(data, "--bundle", small_bundle, "--out", strict_out, "--strict") == 1
    assert not (strict_out / "scores.jsonl").exists()  # stopped before any scoring


def test_a_row_with_text_no_tokenizer_takes_is_a_bad_row_and_the_run_goes_on(
    small_bundle: Path, tmp_path: Path
) -> None:
    good = synthetic_pairs(2)
    surrogate = {"prompt": "a\ud800", "chosen": "x", "rejected": "y"}  # JSON's "\ud800" escape
    data = write_jsonl(tmp_path / "surrogate.jsonl", [good[0], surrogate, good[1]])
    out = tmp_path / "out"
    assert eval_run(data, "--bundle", small_bundle, "--out", out) == 0
    s = summary(out)
    assert s["counts"]["bad_rows"] == 1 and s["counts"]["rows_scored"] == 2
    (bad,) = s["bad_rows"]["first"]
    assert bad["line"] == 2 and "lone surrogate U+D800" in bad["reason"], bad


def test_eval_without_its_plotting_package_stops_before_scoring_a_row(
    small_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rmserve.cli import main as rmserve_main

    # An install without the eval extra, as far as Python's import system can tell: matplotlib is
    # installed here, and a None in sys.modules is how an import of it fails without uninstalling it.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(4))
    out = tmp_path / "out"
    code = rmserve_main(
        ["eval", str(data), "--bundle", str(small_bundle), "--out", str(out), "--no-progress"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "needs the eval extra" in err and "'matplotlib'" in err
    assert not (out / "scores.jsonl").exists(), "rows were scored before the missing module was found"


def test_the_console_summary_counts_its_plots_in_words(small_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        eval_run(
            write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(4)), "--bundle", small_bundle, "--out", out
        )
        == 0
    )
    s = summary(out)
    for plots, words in (
        ([], "and 0 plots"),
        (["scores.png"], "and 1 plot"),
        (["a.png", "b.png"], "and 2 plots"),
    ):
        last = render.console_lines({**s, "plots": plots}, out)[-1]
        assert last.endswith(words), last


def test_killed_run_resumes_without_scoring_a_row_twice(
    small_bundle: Path, shared_data: Path, tmp_path: Path
) -> None:
    data = [shared_data / f for f in SHARED_FILES]
    common = [*data, "--bundle", small_bundle, "--limit", "40", "--chunk-rows", "10", "--no-progress"]
    out = tmp_path / "killed"
    # A real process, stopped uncleanly (os._exit: no summary, no cleanup) after 50 of 120 rows.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rmserve.cli",
            "eval",
            *map(str, common),
            "--out",
            str(out),
            "--stop-after",
            "50",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 75, proc.stderr
    assert len(records(out)) == 50 and not (out / "summary.json").exists()
    with (out / "scores.jsonl").open("a") as fh:
        fh.write('{"key": "torn-in-the-middle-of-a-wri')  # what a SIGKILL during a write leaves

    assert main([*map(str, common), "--out", str(out)]) == 0
    clean = tmp_path / "clean"
    assert main([*map(str, common), "--out", str(clean)]) == 0
    resumed, fresh = summary(out), summary(clean)
    assert resumed["run"]["rows_resumed"] == 50 and resumed["run"]["rows_scored"] == 70
    assert resumed["run"]["items_sent_to_model"] == 70 * 2  # only the rows not yet saved went to the model
    assert resumed["run"]["torn_lines_discarded"] == 1
    a, b = by_key(out), by_key(clean)  # by_key also asserts that no key appears twice
    assert a.keys() == b.keys() and len(a) == 120
    assert all(a[k]["scores"] == b[k]["scores"] for k in a)
    for field in ("accuracy", "subsets", "files", "scores", "counts", "mean_margin", "data"):
        assert resumed[field] == fresh[field], field


def test_a_finished_run_rescored_does_nothing_and_another_model_is_refused(
    small_bundle: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(9))
    out = tmp_path / "out"
    assert eval_run(data, "--bundle", small_bundle, "--out", out) == 0
    assert eval_run(data, "--bundle", small_bundle, "--out", out) == 0
    assert summary(out)["run"]["items_sent_to_model"] == 0 and len(records(out)) == 9
    other = build_small_bundle(tmp_path / "other", seed=1)
    assert eval_run(data, "--bundle", other, "--out", out) == 1
    assert eval_run(data, "--bundle", other, "--out", out, "--restart") == 0
    assert summary(out)["run"]["items_sent_to_model"] == 18


def test_a_run_records_the_backend_and_precision_it_scored_with(small_bundle: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{**r, "subset": "one"} for r in synthetic_pairs(9)])
    out = tmp_path / "out"
    assert eval_run(data, "--bundle", small_bundle, "--out", out) == 0
    version = json.loads((small_bundle / "manifest.json").read_text())["version"]
    run = json.loads((out / "run.json").read_text())
    assert (run["model_version"], run["provider"], run["precision"]) == (version, "cpu", "fp32")
    model = summary(out)["model"]
    assert (model["version"], model["provider"], model["precision"]) == (version, "cpu", "fp32")
    assert f"version `{version}`, scored in process by cpu in fp32." in (out / "report.md").read_text()
    # One subset: no per-subset chart, which would only repeat the overall accuracy.
    assert summary(out)["plots"] == ["scores.png", "margins.png"]
    assert not (out / "accuracy_by_subset.png").exists()
    # Scores of another precision never join these: an --out scored in bf16 is refused.
    (out / "run.json").write_text(json.dumps({**run, "precision": "bf16"}))
    assert eval_run(data, "--bundle", small_bundle, "--out", out) == 1


def scored_pairs(tmp_path: Path, n: int, *options: Any) -> tuple[Path, Path]:
    """(data, out) of an eval run over ``n`` synthetic pairs with ``options``; the run succeeded."""
    data = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(n))
    assert eval_run(data, *options, "--out", tmp_path / "out") == 0
    return data, tmp_path / "out"


def test_eval_without_bundle_or_url_scores_with_the_shipped_default_model(
    default_bundle: Path, tmp_path: Path
) -> None:
    _, out = scored_pairs(tmp_path, 6)
    version = json.loads((default_bundle / "manifest.json").read_text())["version"]
    model = summary(out)["model"]
    assert (model["name"], model["version"], model["mode"]) == ("default", version, "in-process")
    assert len(records(out)) == 6


@pytest.mark.parametrize(
    "margins",
    [
        [-0.19, -0.05, 0.0, 0.02, 0.07],
        [0.3, 0.31, 2.5],
        [-4.0, -1.0],
        [0.0, 0.0],
        list(np.linspace(-2.7, 4.1, 900)),
    ],
)
def test_margin_bins_have_an_edge_at_zero_so_no_bin_holds_wrong_and_right_rows(margins: list[float]) -> None:
    edges = zero_edged_bins(np.asarray(margins), 30)
    assert 0.0 in edges
    assert edges[0] <= min(margins) and edges[-1] >= max(margins)
    widths = np.diff(edges)
    assert np.allclose(widths, widths[0]) and len(edges) <= 33


def test_plots_count_in_whole_numbers_and_no_legend_covers_a_bar_or_label(
    small_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = {}
    save = render._save

    def keep(fig: Any, path: Path, plt: Any) -> str:  # a spy: the real save, figures drawn to look at
        fig.canvas.draw()
        figures[path.name] = fig
        return save(fig, path, plt)

    monkeypatch.setattr(render, "_save", keep)
    scored_pairs(tmp_path, 12, "--bundle", small_bundle)  # three subsets, few rows
    assert set(figures) == {"scores.png", "margins.png", "accuracy_by_subset.png"}
    for name, fig in figures.items():
        ax = fig.axes[0]
        legend = ax.get_legend().get_window_extent()
        covered = [*ax.patches, *ax.texts]
        assert not any(legend.overlaps(a.get_window_extent()) for a in covered), name
        if name != "accuracy_by_subset.png":
            assert all(float(t).is_integer() for t in ax.get_yticks()), (name, ax.get_yticks())


def test_the_report_lists_the_worst_ranked_rows_with_their_margins(
    small_bundle: Path, tmp_path: Path
) -> None:
    data, out = scored_pairs(tmp_path, 30, "--bundle", small_bundle)
    by_margin = sorted(records(out), key=lambda r: r["scores"][0] - r["scores"][1])
    worst = summary(out)["worst_rows"]
    assert [(w["line"], w["margin"]) for w in worst] == [
        (r["line"], pytest.approx(r["scores"][0] - r["scores"][1], abs=1e-6)) for r in by_margin[:10]
    ]
    report = (out / "report.md").read_text()
    table = report[report.index("## Worst-ranked rows") :]
    for w in worst:
        assert f"| `{data}` | {w['line']} | {w['subset']} | {w['margin']:.4f} |" in table


def test_models_listed_in_either_shape_of_v1_models_read_alike() -> None:
    manifest = {"name": "rm", "version": "abc", "precision": "fp32"}
    served = {"precision": "fp32", "manifest": manifest}
    before = {"name": "default", "version": "abc", "provider": "cpu", **served}
    openai = {"id": "default", "object": "model", "backend": "cpu", **served}  # the version in the manifest
    expected = {
        "name": "default",
        "version": "abc",
        "provider": "cpu",
        "precision": "fp32",
        "bundle_name": "rm",
    }
    assert served_entry(before) == served_entry(openai) == expected


def _server_env(bundle: Path) -> dict[str, str]:
    return {
        "RMSERVE_MODELS": str(bundle),
        "RMSERVE_PROVIDER": "cpu",
        "RMSERVE_PRECISION": "fp32",
        "RMSERVE_CACHE": "off",
        "RMSERVE_THREADS": "1",
    }


def _assert_same_scores(local: Path, remote: Path) -> None:
    a, b = by_key(local), by_key(remote)
    assert a.keys() == b.keys()
    worst = max(abs(x - y) for k in a for x, y in zip(a[k]["scores"], b[k]["scores"], strict=True))
    assert worst <= 1e-5, worst
    assert summary(local)["model"]["version"] == summary(remote)["model"]["version"]


def test_in_process_and_server_scores_agree(small_bundle: Path, tmp_path: Path) -> None:
    rows = synthetic_pairs(40)
    data = [
        write_jsonl(tmp_path / "p.jsonl", rows),
        write_jsonl(
            tmp_path / "bon.jsonl",
            [
                {"prompt": r["prompt"], "chosen": [r["chosen"]], "rejected": [r["rejected"], "no"]}
                for r in rows[:8]
            ],
        ),
        write_jsonl(
            tmp_path / "chat.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["chosen"]},
                    ]
                }
                for r in rows[:8]
            ],
        ),
    ]
    assert eval_run(*data, "--bundle", small_bundle, "--out", tmp_path / "local") == 0
    with serve(_server_env(small_bundle), tmp_path) as server:
        assert (
            eval_run(
                *data,
                "--url",
                server.url,
                "--out",
                tmp_path / "remote",
                "--batch-size",
                "8",
                "--concurrency",
                "3",
                "--chunk-rows",
                "16",
            )
            == 0
        )
    _assert_same_scores(tmp_path / "local", tmp_path / "remote")
    remote = summary(tmp_path / "remote")["model"]
    assert remote["mode"] == "server" and (remote["provider"], remote["precision"]) == ("cpu", "fp32")
    assert "by cpu in fp32" in (tmp_path / "remote" / "report.md").read_text()
    assert json.loads((tmp_path / "remote" / "run.json").read_text())["provider"] == "cpu"


# ------------------------------------------------------------------ the default bundle on the shared data


@pytest.fixture(scope="module")
def default_run(default_bundle: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default") / "local"
    assert (
        eval_run(
            *[shared_data / f for f in SHARED_FILES],
            "--bundle",
            default_bundle,
            "--out",
            out,
            "--limit",
            "64",
        )
        == 0
    )
    return out


def test_default_bundle_summary_accuracy_is_the_per_row_accuracy(default_run: Path) -> None:
    s, recs = summary(default_run), records(default_run)
    assert s["counts"]["rows_scored"] == len(recs) == 3 * 64 and s["counts"]["bad_rows"] == 0
    assert s["accuracy"] == pytest.approx(pair_accuracy(recs), abs=1e-6)
    for f in s["files"]:
        assert s["files"][f]["accuracy"] == pytest.approx(
            pair_accuracy([r for r in recs if r["file"] == f]), abs=1e-6
        )
    for name in ("helpful-base", "pandalm", "oasst"):
        assert s["subsets"][name]["accuracy"] == pytest.approx(
            pair_accuracy([r for r in recs if r["subset"] == name]), abs=1e-6
        )
    for png in s["plots"]:
        assert_png(default_run / png)


def test_default_bundle_in_process_and_server_agree(
    default_bundle: Path, default_run: Path, shared_data: Path, tmp_path: Path
) -> None:
    with serve(_server_env(default_bundle), tmp_path) as server:
        assert (
            eval_run(
                *[shared_data / f for f in SHARED_FILES],
                "--url",
                server.url,
                "--out",
                tmp_path / "remote",
                "--limit",
                "64",
                "--concurrency",
                "4",
                "--batch-size",
                "16",
            )
            == 0
        )
    _assert_same_scores(default_run, tmp_path / "remote")
    assert summary(tmp_path / "remote")["accuracy"] == summary(default_run)["accuracy"]
