"""The routes trainers' own clients already speak, each in its client's shapes.

- ``POST /get_reward``: OpenRLHF's remote reward model (``--reward.remote_url``), any number of queries;
- ``POST /v1/reward``: slime's ``--rm-type remote_rm``, one sample per request, a bare number back;
- ``POST /classify``, ``/v1/classify``: vLLM's classify API for a single-label reward model (veRL's
  own reward-model path and AReaL post here).

On a process reward model ``/get_reward`` and ``/v1/reward`` split each response into steps at blank
lines and answer each item's aggregate (the minimum step score) as its reward; ``/get_reward`` adds
``step_scores`` and per-sample step summaries in ``extra_logs``.

OpenRLHF and slime retry blindly (OpenRLHF 5 times, 1 s apart), so these routes wait for room in a
full queue up to their deadline instead of answering 429 at once.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from rmserve import logkeys as keys
from rmserve.api.schemas import (
    ClassifyRequest,
    RewardRequest,
    RewardResponse,
    SlimeRewardRequest,
    error_responses,
    to_messages,
)
from rmserve.api.score import (
    ENGINE_HEADERS,
    DeadlineHeader,
    check_count,
    deadline_of,
    log_body,
    name_engine,
)
from rmserve.errors import BadRequest, TooLarge
from rmserve.items import ChatItem, Item, PairItem, StepsItem, TextItem, split_steps
from rmserve.markup import Outcome, detect, prompt_messages, reread, reread_pair
from rmserve.openrlhf import query_items, step_query_items
from rmserve.scoring import Scorer
from rmserve.served import ScoreResult, Served
from rmserve.state import AppState

router = APIRouter()

# A 1-label model's label in vLLM's answer (its config's default id2label).
_LABEL = "LABEL_0"

# Trainers configure a URL, not a body: these routes name their model in the query string.
ModelQuery = Annotated[
    str | None,
    Query(
        max_length=256,
        description="a served bundle or composite (default: RMSERVE_DEFAULT_MODEL, else the default bundle)",
    ),
]


async def score_waiting(
    state: AppState,
    request: Request,
    response: Response,
    rt: Served,
    items: list[Item],
    deadline: float,
    labels: Sequence[Any] | None = None,
) -> ScoreResult:
    """Every item scored, or an error for the whole request.

    The items go to the scorer in parts the queue can hold; each part waits for room up to the
    deadline (429 only when the queue stays full that long).
    """
    scorer: Scorer = state.ready_scorer()
    request.state.items = len(items)  # for the access log
    size = min(state.settings.max_items_per_request, rt.max_queue_items)

    async def part(start: int) -> ScoreResult:
        chunk = items[start : start + size]
        given = list(labels[start : start + size]) if labels is not None else None
        return await scorer.score(
            rt.name, chunk, strict=False, deadline=deadline, wait_until=deadline, labels=given
        )

    tasks = [asyncio.ensure_future(part(i)) for i in range(0, len(items), size)]
    try:
        parts = await asyncio.gather(*tasks)
    except BaseException:  # the first error answers the request; the other parts stop
        for task in tasks:
            task.cancel()
        raise
    request.state.cache_hits = sum(p.cache_hits for p in parts)
    result = ScoreResult.joined(parts)
    name_engine(response, result)
    return result


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


def _flags(outcomes: Sequence[Outcome], which: Outcome) -> list[float]:
    return [float(o == which) for o in outcomes]


def _step_logs(result: ScoreResult | None) -> dict[str, list[float]]:
    """Per-sample step summaries: OpenRLHF logs each ``extra_logs`` entry as one number per sample
    (``openrlhf/trainer/ppo_utils/sample_maker.py``, ``info[key] = torch.tensor([value])``), so the
    step scores themselves, of a different length per sample, go in ``step_scores`` beside it."""
    steps = result.step_scores if result is not None else []
    dropped = result.item_dropped if result is not None else []
    return {
        keys.STEPS: [float(len(s)) for s in steps or []],
        keys.STEPS_DROPPED: [float(d) for d in dropped],
        keys.STEP_MIN: [min(s) for s in steps or []],
        keys.STEP_MEAN: [sum(s) / len(s) for s in steps or []],
        keys.STEP_LAST: [s[-1] for s in steps or []],
    }


def _component_logs(result: ScoreResult | None) -> dict[str, list[float]]:
    """A composite's components, as OpenRLHF logs extra_logs (one number per sample, each key its own
    metric): ``<component>`` its raw value, ``<component>_normalized`` as normalised, and ``rm_skipped``
    how many components were left out (on_error: skip). No name takes another's key (``rmserve.logkeys``:
    the composites file and the bundle refuse such names)."""
    if result is None or result.components is None:
        return {}
    n = len(result.scores)
    logs = dict(result.components)
    logs |= {keys.normalized_key(name): values for name, values in (result.normalized or {}).items()}
    return logs | {keys.SKIPPED: [float(len(result.skipped))] * n}


@router.post(
    "/get_reward",
    response_model=RewardResponse,
    response_model_exclude_none=True,  # step_scores: process models only
    responses={**ENGINE_HEADERS, **error_responses(400, 401, 408, 413, 422, 429, 500, 503, 504)},
    summary="OpenRLHF remote reward model protocol",
)
async def get_reward(
    body: RewardRequest,
    request: Request,
    response: Response,
    x_request_timeout: DeadlineHeader = None,
    model: ModelQuery = None,
) -> RewardResponse:
    state: AppState = request.app.state.rmserve
    scorer = state.ready_scorer()
    log_body(state, request, body)
    n = len(body.query)
    for name, values in (("prompts", body.prompts), ("labels", body.labels)):
        if values is not None and len(values) != n:
            raise BadRequest(f"{name} has {len(values)} entries but query has {n}")
    rt = scorer.runtime(model)
    deadline = deadline_of(state, request, rt, x_request_timeout, None, state.settings.get_reward_timeout_s)
    step_token = rt.kind.step_token
    if step_token is None:
        items, outcomes = query_items(
            body.query,
            body.prompts,
            rt.formatter,
            state.settings.max_chars_per_item,
            retemplate=state.settings.retemplate,
        )
    else:
        items, outcomes = step_query_items(
            body.query,
            body.prompts,
            rt.formatter,
            step_token,
            state.settings.max_chars_per_item,
            retemplate=state.settings.retemplate,
        )
    result = None
    if items:
        result = await score_waiting(state, request, response, rt, items, deadline, body.labels)
    # Several reward URLs and one sample: OpenRLHF sends the other servers empty lists.
    scores = result.scores if result is not None else []
    logs = {
        keys.TOKENS: [float(t) for t in (result.item_tokens if result is not None else [])],
        keys.TRUNCATED: [float(t) for t in (result.item_truncated if result is not None else [])],
        keys.RETEMPLATED: _flags(outcomes, "retemplated"),
        keys.UNRECOGNISED: _flags(outcomes, "unrecognised"),
    } | _component_logs(result)
    if step_token is None:
        return RewardResponse(rewards=scores, scores=scores, extra_logs=logs)
    step_scores = result.step_scores if result is not None else []
    return RewardResponse(
        rewards=scores, scores=scores, extra_logs=logs | _step_logs(result), step_scores=step_scores
    )


def _slime_steps(rt: Served, body: SlimeRewardRequest) -> tuple[Item, Outcome]:
    """A process model's item: the response in steps (blank lines), the prompt's messages if it has any."""
    steps = split_steps(body.response)
    if not isinstance(body.prompt, str):
        return StepsItem(to_messages(body.prompt), steps), "as_is"
    markup = detect(body.prompt)
    context = prompt_messages(body.prompt, markup) if markup is not None else None
    outcome: Outcome = "retemplated" if context and markup != rt.formatter.markup else "as_is"
    return StepsItem(context or body.prompt, steps), outcome


def _slime_item(rt: Served, body: SlimeRewardRequest, retemplate: bool) -> tuple[Item, Outcome]:
    if rt.kind.step_token is not None:
        return _slime_steps(rt, body)
    if not isinstance(body.prompt, str):
        return PairItem(to_messages(body.prompt), body.response), "as_is"
    if rt.formatter.settings.input_format == "plain":
        return TextItem(body.prompt + body.response), "as_is"
    reading = reread_pair(body.prompt, body.response, rt.formatter.markup, enabled=retemplate)
    if reading is None:  # a prompt without chat markup: the user's words
        return PairItem(body.prompt, body.response), "as_is"
    return reading.item, reading.outcome


@router.post(
    "/v1/reward",
    response_model=float,
    responses={**ENGINE_HEADERS, **error_responses(401, 408, 413, 422, 429, 500, 503, 504)},
    summary="slime's remote reward model protocol: one sample, a bare number back",
)
async def slime_reward(
    body: SlimeRewardRequest,
    request: Request,
    response: Response,
    x_request_timeout: DeadlineHeader = None,
    model: ModelQuery = None,
) -> float:
    state: AppState = request.app.state.rmserve
    scorer = state.ready_scorer()
    log_body(state, request, body)
    rt = scorer.runtime(model)
    deadline = deadline_of(state, request, rt, x_request_timeout, None)
    chars = len(body.response) + (
        len(body.prompt) if isinstance(body.prompt, str) else sum(m.chars() for m in body.prompt)
    )
    if chars > state.settings.max_chars_per_item:
        raise TooLarge(f"{chars} characters is over the limit of {state.settings.max_chars_per_item}")
    item, outcome = _slime_item(rt, body, state.settings.retemplate)
    response.headers["X-RMServe-Template"] = outcome
    result = await score_waiting(state, request, response, rt, [item], deadline, [body.label])
    return result.scores[0]


def _classify_items(rt: Served, body: ClassifyRequest, retemplate: bool) -> list[Item]:
    if body.messages is not None:
        return [ChatItem(to_messages(body.messages))]
    texts = body.texts()
    fmt = rt.formatter.settings
    if fmt.input_format != "chat_template":
        return [TextItem(t) for t in texts]
    items = [reread(t, rt.formatter.markup, enabled=retemplate).item for t in texts]
    # vLLM tokenizes input with the model's special tokens: veRL strips the BOS its template wrote.
    bos = fmt.bos_token if body.add_special_tokens and not fmt.add_special_tokens else None
    return [
        TextItem(bos + i.text) if bos and isinstance(i, TextItem) and not i.text.startswith(bos) else i
        for i in items
    ]


async def _classify(
    request: Request,
    response: Response,
    body: ClassifyRequest,
    x_request_timeout: float | None,
    model: str | None,
) -> dict[str, Any]:
    state: AppState = request.app.state.rmserve
    scorer = state.ready_scorer()
    log_body(state, request, body)
    # ?model= first; vLLM clients name the checkpoint they think is served (veRL sends its model path),
    # which names the model only when it is served.
    named = body.model if body.model in scorer.served() else None
    rt = scorer.runtime(model if model is not None else named)
    deadline = deadline_of(state, request, rt, x_request_timeout, None)
    items = _classify_items(rt, body, state.settings.retemplate)
    check_count(state, len(items))
    for i, item in enumerate(items):
        if isinstance(item, TextItem) and len(item.text) > state.settings.max_chars_per_item:
            raise TooLarge(f"input[{i}]: {len(item.text)} characters is over the limit")
    result = await score_waiting(state, request, response, rt, items, deadline) if items else None
    scores = result.scores if result is not None else []
    tokens = result.tokens if result is not None else 0
    # vLLM's default for one label is the sigmoid (its PoolerClassify); use_activation=false: raw.
    activate = body.applies_activation()
    return {
        "id": f"classify-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": rt.name,
        "data": [
            {
                "index": i,
                "label": _LABEL,
                "probs": [_sigmoid(s) if activate else s],
                "num_classes": 1,
            }
            for i, s in enumerate(scores)
        ],
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
    }


_CLASSIFY_RESPONSES = {**ENGINE_HEADERS, **error_responses(400, 401, 408, 413, 422, 429, 500, 503, 504)}
_CLASSIFY_SUMMARY = "vLLM's classify API for a single-label reward model"


@router.post("/classify", responses=_CLASSIFY_RESPONSES, summary=_CLASSIFY_SUMMARY)
async def classify(
    body: ClassifyRequest,
    request: Request,
    response: Response,
    x_request_timeout: DeadlineHeader = None,
    model: ModelQuery = None,
) -> dict[str, Any]:
    return await _classify(request, response, body, x_request_timeout, model)


@router.post("/v1/classify", responses=_CLASSIFY_RESPONSES, summary=_CLASSIFY_SUMMARY)
async def classify_v1(
    body: ClassifyRequest,
    request: Request,
    response: Response,
    x_request_timeout: DeadlineHeader = None,
    model: ModelQuery = None,
) -> dict[str, Any]:
    return await _classify(request, response, body, x_request_timeout, model)
