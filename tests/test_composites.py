"""Composites: several served models and rules as one reward, against live servers.

The bundles are the shipped default model (an encoder, text_pair) and a tiny random-init Llama exported
in the test (a decoder, chat_template). Every expected value is computed here from each component's own
``/v1/score`` answer, the default bundle's own tokenizer file and the formula docs/composites.md gives.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer

from rmserve.bundle import default_bundle_path
from rmserve.composites.rules import extract_answer, last_boxed, same_answer
from rmserve.composites.spec import CompositeError, check_references, read_composites
from tests.support.redis import delete_prefix, shared_redis_url, unique_prefix
from tests.support.server import ServerProcess, free_port, serve

COMPOSITES = """
composites:
  helpful-safe:
    combine: sum
    components:
      - {name: helpful, bundle: default, weight: 1.0, normalize: {kind: affine, scale: 2.0, shift: 1.0}}
      - {name: safety, bundle: llama, weight: 0.5}
      - {name: length, rule: length, tokenizer: default, target: 8, weight: 0.2}
      - {name: correct, rule: label_match, extract: last_number, weight: 2.0}
  lenient:
    components:
      - {name: helpful, bundle: default}
      - {name: correct, rule: label_match, extract: last_number, on_error: skip}
  cautious:
    combine: gate
    floor: -5.0
    components:
      - {name: both, bundle: helpful-safe}
      - {name: polite, rule: regex, pattern: "(?i)please|thanks", threshold: 0.5}
  worst:
    combine: min
    components:
      - {name: helpful, bundle: default}
      - {name: safety, bundle: llama, weight: 3.0}
  running:
    components:
      - {name: safety, bundle: llama, normalize: {kind: zscore, window: 6}}
"""

ITEMS = [
    {"prompt": "What is 6 times 7?", "response": "It is 42.", "label": "42"},
    {"prompt": "What is 6 times 7?", "response": "Thanks for asking, it is 41.", "label": 42},
    {"prompt": "Name a colour.", "response": "Blue, please.", "label": "7"},
]


def _post(server: ServerProcess, path: str, body: Any, **params: str) -> Any:
    reply = httpx.post(server.url + path, json=body, params=params, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _own_scores(server: ServerProcess, model: str, items: list[dict[str, Any]]) -> list[float]:
    plain = [{"prompt": i["prompt"], "response": i["response"]} for i in items]
    return list(_post(server, "/v1/score", {"model": model, "items": plain})["scores"])


def _tokens(text: str) -> int:
    tok = Tokenizer.from_file(str(default_bundle_path() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return len(tok.encode(text, add_special_tokens=False).ids)


def _expected(server: ServerProcess, items: list[dict[str, Any]]) -> dict[str, list[float]]:
    """helpful-safe's components, normalised, from each component's own answer and the rules' formulas."""
    helpful = _own_scores(server, "default", items)
    safety = _own_scores(server, "llama", items)
    return {
        "helpful": [2.0 * x + 1.0 for x in helpful],
        "safety": safety,
        "length": [-abs(_tokens(i["response"]) - 8) / 8 for i in items],
        "correct": [1.0, 0.0, 0.0],
    }


def _combined(norm: dict[str, list[float]], n: int) -> list[float]:
    weights = {"helpful": 1.0, "safety": 0.5, "length": 0.2, "correct": 2.0}
    return [sum(weights[k] * norm[k][i] for k in weights) for i in range(n)]


@pytest.fixture(scope="module")
def llama(tiny_bundles: dict[str, Path]) -> Path:
    return tiny_bundles["llama"]


@pytest.fixture(scope="module")
def composites_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("composites") / "composites.yaml"
    path.write_text(COMPOSITES)
    return path


def _env(llama: Path, composites: Path, **more: str) -> dict[str, str]:
    return {
        "RMSERVE_MODELS": f"default={default_bundle_path()},llama={llama}",
        "RMSERVE_COMPOSITES": str(composites),
        "RMSERVE_CACHE": "memory",
        **more,
    }


@pytest.fixture(scope="module")
def server(
    llama: Path, composites_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with serve(_env(llama, composites_file), tmp_path_factory.mktemp("server")) as running:
        yield running


def test_a_composite_scores_the_formula_applied_to_each_components_own_score(server: ServerProcess) -> None:
    body = _post(server, "/v1/score", {"model": "helpful-safe", "items": ITEMS})
    norm = _expected(server, ITEMS)
    assert body["model"] == "helpful-safe"
    assert body["normalized"] == norm  # the same arithmetic on the same floats: equal, not close
    assert body["components"]["helpful"] == _own_scores(server, "default", ITEMS)
    assert body["scores"] == _combined(norm, len(ITEMS))
    assert "skipped" not in body["usage"]


def test_a_length_rule_reports_its_raw_value_and_the_label_check_reads_numbers_as_numbers(
    server: ServerProcess,
) -> None:
    body = _post(server, "/v1/score", {"model": "helpful-safe", "items": ITEMS})
    assert body["components"]["length"] == [-abs(_tokens(i["response"]) - 8) / 8 for i in ITEMS]
    # "42" and 42 both match "It is 42."; 41 is not 42; no number equals "7" in "Blue, please."
    assert body["components"]["correct"] == [1.0, 0.0, 0.0]


def test_a_composite_is_served_on_every_scoring_route(server: ServerProcess) -> None:
    expected = _post(server, "/v1/score", {"model": "helpful-safe", "items": ITEMS})
    queries = [i["prompt"] + i["response"] for i in ITEMS]
    reward = _post(
        server,
        "/get_reward",
        {"query": queries, "prompts": [i["prompt"] for i in ITEMS], "labels": [i["label"] for i in ITEMS]},
        model="helpful-safe",
    )
    assert reward["rewards"] == pytest.approx(expected["scores"], rel=1e-12)
    for name in ("helpful", "safety", "length", "correct"):
        assert reward["extra_logs"][name] == pytest.approx(expected["components"][name], rel=1e-12)
        assert reward["extra_logs"][f"{name}_normalized"] == pytest.approx(
            expected["normalized"][name], rel=1e-12
        )
    assert reward["extra_logs"]["rm_skipped"] == [0.0, 0.0, 0.0]
    slime = _post(
        server,
        "/v1/reward",
        {"prompt": ITEMS[0]["prompt"], "response": ITEMS[0]["response"], "label": ITEMS[0]["label"]},
        model="helpful-safe",
    )
    assert slime == pytest.approx(expected["scores"][0], rel=1e-12)
    texts = ["\n\nHuman: Name a colour.\n\nAssistant: Blue, please."]
    as_text = _post(server, "/v1/score", {"model": "worst", "items": [{"text": t} for t in texts]})
    for path in ("/classify", "/v1/classify"):
        answer = _post(
            server, path, {"model": "ignored", "input": texts, "use_activation": False}, model="worst"
        )
        assert answer["model"] == "worst"
        assert [d["probs"][0] for d in answer["data"]] == pytest.approx(as_text["scores"], rel=1e-12)


def test_the_model_list_shows_each_composite_with_its_components(server: ServerProcess) -> None:
    listed = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {"default", "llama", "helpful-safe", "running"} <= set(listed)
    composite = listed["helpful-safe"]
    assert composite["kind"] == "composite" and composite["combine"] == "sum"
    assert [c["name"] for c in composite["components"]] == ["helpful", "safety", "length", "correct"]
    assert composite["components"][0]["normalize"] == {"kind": "affine", "scale": 2.0, "shift": 1.0}


def test_min_takes_the_least_weighted_component(server: ServerProcess) -> None:
    body = _post(server, "/v1/score", {"model": "worst", "items": ITEMS})
    helpful, safety = _own_scores(server, "default", ITEMS), _own_scores(server, "llama", ITEMS)
    assert body["scores"] == [min(h, 3.0 * s) for h, s in zip(helpful, safety, strict=True)]


def test_a_gate_below_its_threshold_sets_the_floor_and_a_nested_composite_is_a_component(
    server: ServerProcess,
) -> None:
    body = _post(server, "/v1/score", {"model": "cautious", "items": ITEMS})
    inner = _post(server, "/v1/score", {"model": "helpful-safe", "items": ITEMS})["scores"]
    assert body["components"]["both"] == pytest.approx(inner, rel=1e-12)
    assert body["components"]["polite"] == [0.0, 1.0, 1.0]
    assert body["scores"][0] == -5.0  # not polite: gated to the floor
    assert body["scores"][1:] == pytest.approx([inner[1] + 1.0, inner[2] + 1.0], rel=1e-12)


def test_a_failing_component_fails_the_request_naming_it(server: ServerProcess) -> None:
    unlabelled = [{"prompt": "What is 6 times 7?", "response": "42"}]
    reply = httpx.post(server.url + "/v1/score", json={"model": "helpful-safe", "items": unlabelled})
    assert reply.status_code == 422
    message = reply.json()["error"]["message"]
    assert "'helpful-safe'" in message and "'correct'" in message and "items[0]" in message
    long = [{"prompt": "word " * 400, "response": "42", "label": 42}]
    reply = httpx.post(
        server.url + "/v1/score", json={"model": "helpful-safe", "items": long, "truncation": "error"}
    )
    assert reply.status_code == 413
    assert "component 'helpful'" in reply.json()["error"]["message"]


def test_a_component_that_may_be_skipped_is_left_out_and_reported(server: ServerProcess) -> None:
    unlabelled = [{"prompt": "What is 6 times 7?", "response": "42"}]
    body = _post(server, "/v1/score", {"model": "lenient", "items": unlabelled})
    assert body["usage"]["skipped"] == ["correct"]
    assert set(body["components"]) == {"helpful"}
    assert body["scores"] == _own_scores(server, "default", unlabelled)
    labelled = _post(server, "/v1/score", {"model": "lenient", "items": [{**unlabelled[0], "label": "42"}]})
    assert "skipped" not in labelled["usage"]
    assert labelled["scores"] == pytest.approx([body["scores"][0] + 1.0], rel=1e-12)


def test_a_label_never_changes_a_bundles_score_or_cache_key(server: ServerProcess) -> None:
    items = [{"prompt": "A label test prompt.", "response": "An answer never scored before."}]
    first = _post(server, "/v1/score", {"model": "default", "items": items})
    again = _post(server, "/v1/score", {"model": "default", "items": [{**items[0], "label": "anything"}]})
    assert again["scores"] == first["scores"]
    assert first["usage"]["cache_hits"] == 0 and again["usage"]["cache_hits"] == 1


def test_a_default_model_chosen_at_start_up_answers_routes_that_name_none(
    llama: Path, composites_file: Path, tmp_path: Path
) -> None:
    with serve(_env(llama, composites_file, RMSERVE_DEFAULT_MODEL="helpful-safe"), tmp_path) as srv:
        reward = _post(
            srv,
            "/get_reward",
            {
                "query": [ITEMS[0]["prompt"] + ITEMS[0]["response"]],
                "prompts": [ITEMS[0]["prompt"]],
                "labels": [42],
            },
        )
        expected = _post(srv, "/v1/score", {"model": "helpful-safe", "items": ITEMS[:1]})
        assert reward["rewards"] == pytest.approx(expected["scores"], rel=1e-12)
        assert "correct" in reward["extra_logs"]
        unnamed = _post(srv, "/v1/score", {"items": ITEMS[:1]})
        assert unnamed["model"] == "helpful-safe"


def test_without_redis_a_replica_normalises_by_the_window_it_holds_itself(server: ServerProcess) -> None:
    listed = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert listed["running"]["normalize_state"] == "memory"
    raw: list[float] = []
    for b in range(3):
        batch = [{"prompt": f"Memory {b}.{i}?", "response": f"Reply {b * 10 + i}."} for i in range(4)]
        body = _post(server, "/v1/score", {"model": "running", "items": batch})
        raw += body["components"]["safety"]
        window = raw[-6:]
        mean, std = statistics.fmean(window), statistics.pstdev(window)
        assert body["scores"] == pytest.approx([(x - mean) / std for x in raw[-4:]], rel=1e-9)


def test_two_replicas_normalise_with_one_running_window_held_in_redis(
    llama: Path, composites_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url, why = shared_redis_url(tmp_path_factory.mktemp("redis"))
    if url is None:
        pytest.skip(why)
    prefix = unique_prefix()
    env = _env(llama, composites_file, RMSERVE_REDIS_URL=url, RMSERVE_CACHE_PREFIX=prefix)
    batches = [
        [{"prompt": f"Question {b}.{i}?", "response": f"Answer number {b * 10 + i}."} for i in range(3)]
        for b in range(3)
    ]
    try:
        with (
            serve(env, tmp_path_factory.mktemp("one")) as one,
            serve(env, tmp_path_factory.mktemp("two")) as two,
        ):
            raw: list[float] = []
            for batch, replica in zip(batches, (one, two, one), strict=True):
                body = _post(replica, "/v1/score", {"model": "running", "items": batch})
                raw += body["components"]["safety"]
                assert body["components"]["safety"] == _own_scores(replica, "llama", batch)
                window = raw[-6:]  # the last six values, whichever replica scored them
                mean, std = statistics.fmean(window), statistics.pstdev(window)
                assert body["scores"] == pytest.approx([(x - mean) / std for x in raw[-3:]], rel=1e-9)
    finally:
        delete_prefix(url, prefix)


def test_a_running_window_redis_cannot_hold_fails_the_request_naming_the_component(
    llama: Path, composites_file: Path, tmp_path: Path
) -> None:
    nothing = f"redis://127.0.0.1:{free_port()}/0"  # a port nothing listens on: a real refused connection
    with serve(_env(llama, composites_file, RMSERVE_REDIS_URL=nothing), tmp_path) as srv:
        reply = httpx.post(srv.url + "/v1/score", json={"model": "running", "items": ITEMS[:1]}, timeout=60)
        assert reply.status_code == 500
        error = reply.json()["error"]
        assert error["type"] == "component_failed"
        assert error["message"].startswith("composite 'running', component 'safety': failed (")
        assert "composite running, component safety failed" in srv.log()  # with its trace, for the operator
        assert _post(srv, "/v1/score", {"model": "helpful-safe", "items": ITEMS[:1]})["scores"]


def test_start_up_fails_naming_an_unknown_component_a_cycle_or_a_weight_that_is_not_finite(
    tmp_path: Path,
) -> None:
    def problem(text: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(CompositeError) as caught:
            check_references(read_composites(path), {"default", "llama"})
        return str(caught.value)

    unknown = problem("composites:\n  a:\n    components:\n      - {name: x, bundle: nowhere}\n")
    assert "composite 'a', component 'x'" in unknown and "'nowhere' is not served" in unknown
    cycle = problem(
        "composites:\n  a:\n    components:\n      - {name: x, bundle: b}\n"
        "  b:\n    components:\n      - {name: y, bundle: a}\n"
    )
    assert "contains a cycle: a -> b -> a" in cycle
    weight = problem("composites:\n  a:\n    components:\n      - {name: x, bundle: default, weight: .nan}\n")
    assert "composites.a.components[0].weight" in weight and "finite" in weight
    tokenizer = problem(
        "composites:\n  a:\n    components:\n      - {name: n, rule: length, tokenizer: a, target: 5}\n"
    )
    assert "component 'n': tokenizer 'a' is not served" in tokenizer


def test_a_server_given_a_cyclic_composite_exits_before_it_listens_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("composites:\n  loop:\n    components:\n      - {name: me, bundle: loop}\n")
    env = {"RMSERVE_COMPOSITES": str(path), "RMSERVE_CACHE": "off"}
    with serve(env, tmp_path, ready=False) as srv:
        assert srv.process.wait(timeout=60) != 0
        assert "composite 'loop' contains a cycle: loop -> loop" in srv.log()


@pytest.mark.parametrize(
    ("text", "how", "answer"),
    [
        ("so \\boxed{\\frac{1}{2}} and then \\boxed{x^{2}}", "boxed", "x^{2}"),
        ("no box here", "boxed", None),
        ("it costs 1,234.5 or -3", "last_number", "-3"),
        ("it costs 1,234.5 dollars", "last_number", "1,234.5"),
        ("  Paris \n", "text", "Paris"),
    ],
)
def test_the_answer_is_taken_as_documented(text: str, how: str, answer: str | None) -> None:
    assert extract_answer(text, how) == answer


def test_numbers_compare_as_numbers_and_other_answers_as_text() -> None:
    assert same_answer("1,234.5", 1234.5) and same_answer("42", "42.0") and same_answer("4.2e1", 42)
    assert not same_answer("41", 42)
    assert same_answer("Paris", " Paris") and not same_answer("paris", "Paris")
    assert last_boxed("\\boxed{unclosed") is None
