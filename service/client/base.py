"""Everything a client decides, none of what it does: no sockets, no sleeping, no threads.

``BaseRewardClient`` holds the options, builds and chunks requests, decides retries, and writes
each operation as a generator of ``Step``s (``rmserve.client.steps``). ``RewardClient`` and
``AsyncRewardClient`` carry the steps out, each in its own way, and stay thin mirrors.

Retries: only 429, 502, 503, a 500 without rmserve's error body (a proxy's: Ray Serve's when the
replica it forwarded to died) and connection failures (refused, reset, dropped mid-answer). Scoring
is a pure function of its input, so a retried request cannot do harm twice; 502 is what a proxy or
Kubernetes ingress answers while a pod restarts. Never retried: any other 4xx (the input is wrong
and stays wrong), rmserve's own 500 (the model failed; the request id is in the message), 504 and
client read timeouts
(the server already spent the deadline on this work: resending it under load only adds load).
Backoff is exponential with full jitter; a ``Retry-After`` header sets the least wait. After
``max_retries`` retries the client raises ``RetryBudgetExceeded`` carrying the last error.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import httpx

from rmserve.client.errors import (
    BadRequestError,
    OverloadedError,
    ProtocolError,
    RetryBudgetExceeded,
    RewardServerError,
    ServerUnavailableError,
)
from rmserve.client.items import ItemLike, to_item
from rmserve.client.responses import (
    json_body,
    merge_rewards,
    merge_scores,
    parse_health,
    parse_reward,
    parse_score,
    parse_steps,
    raise_for,
    transport_error,
)
from rmserve.client.results import Health, RewardResult, ScoreResult
from rmserve.client.steps import Call, Gather, Operation, Reply, Send, Sleep
from rmserve.items import text_problem

DEFAULT_URL = "http://127.0.0.1:8000"
# OpenRLHF waits 180 s for a reward; a trainer step is worth as much to us.
DEFAULT_TIMEOUT = httpx.Timeout(180.0, connect=10.0)
DEFAULT_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=30.0)
RETRY_STATUSES = frozenset({429, 502, 503})
_ROUTE_SUFFIXES = ("/get_reward", "/v1/score", "/v1")


def normalize_base_url(url: str) -> str:
    """Accept the server's root, or a route URL pasted from a trainer config (``.../get_reward``)."""
    url = url.rstrip("/")
    for suffix in _ROUTE_SUFFIXES:
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


class BaseRewardClient:
    """The options, the request plans and the retry policy shared by both clients."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        model: str | None = None,
        api_key: str | None = None,
        chunk_size: int = 64,
        max_concurrency: int = 4,
        max_retries: int = 5,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        max_retry_after_s: float = 60.0,
        truncation: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if chunk_size < 1 or max_concurrency < 1 or max_retries < 0:
            raise ValueError("chunk_size and max_concurrency must be >= 1, max_retries >= 0")
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.truncation = truncation
        self._rng = rng or random.Random()
        self._headers = {"Accept": "application/json", "User-Agent": "rmserve-client"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, model={self.model!r})"

    # -- request building and chunking

    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.chunk_size, n)) for i in range(0, n, self.chunk_size)]

    def _score_calls(
        self,
        items: Iterable[ItemLike],
        model: str | None,
        truncation: str | None,
        aggregate: str | None = None,
    ) -> list[Call]:
        if isinstance(items, (str, Mapping)):
            raise BadRequestError("score() takes a list of items, not a single item", type="invalid_request")
        payload = [to_item(v, i) for i, v in enumerate(items)]
        for i, item in enumerate(payload):
            _check_texts(f"items[{i}]", item)
        extra: dict[str, Any] = {}
        if model or self.model:
            extra["model"] = model or self.model
        if truncation or self.truncation:
            extra["truncation"] = truncation or self.truncation
        if aggregate:
            extra["step_aggregate"] = aggregate
        return [
            Call(
                "POST",
                "/v1/score",
                {"items": payload[s], **extra},
                prefix_header(map(item_prompt, payload[s])),
            )
            for s in self._chunks(len(payload))
        ]

    def _reward_calls(
        self, queries: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[Any] | None
    ) -> list[Call]:
        if isinstance(queries, str):
            raise BadRequestError(
                "get_reward() takes a list of queries, not one string", type="invalid_request"
            )
        for name, values in (("prompts", prompts), ("labels", labels)):
            if values is not None and len(values) != len(queries):
                raise BadRequestError(
                    f"{name} has {len(values)} entries but queries has {len(queries)}", type="invalid_request"
                )
        for name, texts in (("query", queries), ("prompts", prompts or ())):
            for i, text in enumerate(texts):
                _check_texts(f"{name}[{i}]", text)
        # The route names its model in the query string (OpenRLHF posts a URL it was given).
        path = "/get_reward" + (f"?{urlencode({'model': self.model})}" if self.model else "")
        calls = []
        for s in self._chunks(len(queries)):
            body: dict[str, Any] = {"query": list(queries[s])}
            if prompts is not None:
                body["prompts"] = list(prompts[s])
            if labels is not None:
                body["labels"] = list(labels[s])
            calls.append(Call("POST", path, body, prefix_header(prompts[s] if prompts else ())))
        return calls

    # -- retries

    def _retry_delay(self, error: RewardServerError, attempt: int) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None: this error is not retried."""
        if not isinstance(error, (OverloadedError, ServerUnavailableError)):
            return None
        delay = self._rng.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2**attempt))  # full jitter
        if error.retry_after_s is not None:
            delay = max(delay, min(error.retry_after_s, self.max_retry_after_s))
        return delay

    def _exchange(self, call: Call) -> Operation[Any]:
        """One logical request: send, map errors, back off and resend; returns the parsed JSON."""
        attempt = 0
        while True:
            outcome = yield Send(call)
            try:
                if isinstance(outcome, httpx.TransportError):
                    raise transport_error(outcome)
                assert isinstance(outcome, Reply)
                raise_for(outcome)
                body = json_body(outcome)
                if body is None:
                    raise ProtocolError(f"{call.path} answered {outcome.status} without a JSON body")
                return body
            except RewardServerError as err:
                delay = self._retry_delay(err, attempt)
                if delay is None:
                    raise
                if attempt >= self.max_retries:
                    tries = attempt + 1
                    raise RetryBudgetExceeded(
                        f"gave up on {call.path} after {tries} attempts: {err.message}", err, tries
                    ) from err
                attempt += 1
                yield Sleep(delay)

    # -- the operations both clients run

    def _score(
        self, items: Iterable[ItemLike], model: str | None, truncation: str | None
    ) -> Operation[ScoreResult]:
        parts = yield Gather(self._score_calls(items, model, truncation), parse_score)
        return merge_scores(parts)

    def _score_steps(
        self, items: Iterable[ItemLike], model: str | None, truncation: str | None, aggregate: str | None
    ) -> Operation[ScoreResult]:
        parts = yield Gather(self._score_calls(items, model, truncation, aggregate), parse_steps)
        return merge_scores(parts)

    def _get_reward(
        self, queries: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[Any] | None
    ) -> Operation[RewardResult]:
        parts = yield Gather(self._reward_calls(queries, prompts, labels), parse_reward)
        return merge_rewards(parts)

    def _models(self) -> Operation[list[dict[str, Any]]]:
        body = yield from self._exchange(Call("GET", "/v1/models"))
        listed = body.get("data", body.get("models")) if isinstance(body, dict) else None  # OpenAI's, or ours
        return list(listed) if isinstance(listed, list) else []

    def _health(self) -> Operation[Health]:
        """Live and ready, as the server answers them now (no retries)."""
        live = yield Send(Call("GET", "/health/live"))
        ready = yield Send(Call("GET", "/health/ready"))
        return parse_health(live, ready)

    def _wait_until_ready(self, timeout_s: float, poll_s: float) -> Operation[Health]:
        deadline = time.monotonic() + timeout_s
        while True:
            health = yield from self._health()
            if health.ready:
                return health
            if time.monotonic() >= deadline:
                raise ServerUnavailableError(f"{self.base_url} not ready in {timeout_s} s: {health.status}")
            yield Sleep(poll_s)


PREFIX_HEADER = "x-prefix-key"


def item_prompt(item: Mapping[str, Any]) -> Any:
    """What an API item's responses share: its prompt, or a conversation's messages before the last;
    None for formatted text."""
    if "prompt" in item:
        return item["prompt"]
    messages = item.get("messages")
    return messages[:-1] if isinstance(messages, list) and len(messages) > 1 else None


def prefix_header(prompts: Iterable[Any]) -> tuple[tuple[str, str], ...]:
    """``x-prefix-key``: a hash of the first prompt of a request, for a router that keeps one prompt's
    requests on one replica (docs/prefix-reuse.md). A routing hint only: the server scores the same
    with or without it."""
    prompt = next((p for p in prompts if p is not None), None)
    if prompt is None:
        return ()
    canonical = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return ((PREFIX_HEADER, hashlib.sha256(canonical.encode()).hexdigest()[:32]),)


def _check_texts(where: str, value: Any) -> None:
    """Raise BadRequestError, as the server would answer, for a text no UTF-8 body can carry."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise BadRequestError(f"{where}: {problem}", type="invalid_request")
    elif isinstance(value, Mapping):
        for key, inner in value.items():
            _check_texts(f"{where}.{key}", inner)
    elif isinstance(value, list | tuple):
        for i, inner in enumerate(value):
            _check_texts(f"{where}[{i}]", inner)
