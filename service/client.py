"""A Python client for rmserve, built like httpx: all logic in a base class with no I/O.

``BaseRewardClient`` builds requests, plans chunks, parses answers, maps errors and decides retries;
it never touches the network. Its ``_exchange`` generator yields what to do next (``Send`` a request
or ``Sleep``) and is driven by ``RewardClient`` (httpx.Client, threads for chunks) or
``AsyncRewardClient`` (httpx.AsyncClient, a semaphore for chunks), which stay thin mirrors.

Retries: only 429, 502, 503 and connection failures (refused, reset, dropped mid-answer). Scoring is
a pure function of its input, so a retried request cannot do harm twice; 502 is what a proxy or
Kubernetes ingress answers while a pod restarts. Never retried: any other 4xx (the input is wrong and
stays wrong), 500 (the model failed; the request id is in the message), 504 and client read timeouts
(the server already spent the deadline on this work: resending it under load only adds load).
Backoff is exponential with full jitter; a ``Retry-After`` header sets the least wait. After
``max_retries`` retries the client raises ``RetryBudgetExceeded`` carrying the last error.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import httpx

__all__ = [
    "AsyncRewardClient",
    "AuthenticationError",
    "BadRequestError",
    "DeadlineExceededError",
    "Health",
    "ModelNotFoundError",
    "OverloadedError",
    "ProtocolError",
    "RequestTooLargeError",
    "RetryBudgetExceeded",
    "RewardClient",
    "RewardResult",
    "RewardServerError",
    "ScoreResult",
    "ServerConnectionError",
    "ServerError",
    "ServerUnavailableError",
    "Usage",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# OpenRLHF waits 180 s for a reward; a trainer step is worth as much to us.
DEFAULT_TIMEOUT = httpx.Timeout(180.0, connect=10.0)
DEFAULT_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=30.0)
RETRY_STATUSES = frozenset({429, 502, 503})
_ROUTE_SUFFIXES = ("/get_reward", "/v1/score", "/v1")

T = TypeVar("T")
Message = Mapping[str, Any]
# What ``score`` accepts per item: (prompt, response), an API-shaped dict, a message list, or text.
ItemLike = tuple[Any, str] | Mapping[str, Any] | Sequence[Message] | str


# ---------------------------------------------------------------- errors: one hierarchy


class RewardServerError(Exception):
    """Base of every error the client raises. ``status`` is None when no HTTP answer came back."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.request_id = request_id
        self.retry_after_s = retry_after_s


class BadRequestError(RewardServerError):
    """A 4xx: the request is wrong as sent (the message names the item). Never retried."""


class AuthenticationError(BadRequestError):
    """401: the server wants an API key and got none or a wrong one."""


class ModelNotFoundError(BadRequestError):
    """404: no loaded bundle has that name (or several are loaded and none was named)."""


class RequestTooLargeError(BadRequestError):
    """413: too many items, a body too large, or an item over max_length with truncation "error"."""


class OverloadedError(RewardServerError):
    """429: the server's queue is full; it says when to come back (``retry_after_s``)."""


class ServerUnavailableError(RewardServerError):
    """503 (starting or draining) or 502 from a proxy in front of it."""


class ServerConnectionError(ServerUnavailableError):
    """No answer: connection refused, reset or dropped before the response was complete."""


class DeadlineExceededError(RewardServerError):
    """504 from the server, or the client's own timeout while waiting for the answer."""


class ServerError(RewardServerError):
    """500 and any other 5xx: the server failed; the message carries its request id."""


class ProtocolError(RewardServerError):
    """The server answered 200 with a body that is not what the API promises."""


class RetryBudgetExceeded(RewardServerError):
    """Retries ran out; ``last_error`` is the error of the final attempt."""

    def __init__(self, message: str, last_error: RewardServerError, attempts: int) -> None:
        super().__init__(
            message,
            status=last_error.status,
            type=last_error.type,
            request_id=last_error.request_id,
            retry_after_s=last_error.retry_after_s,
        )
        self.last_error = last_error
        self.attempts = attempts


_STATUS_ERRORS: dict[int, type[RewardServerError]] = {
    401: AuthenticationError,
    404: ModelNotFoundError,
    413: RequestTooLargeError,
    429: OverloadedError,
    502: ServerUnavailableError,
    503: ServerUnavailableError,
    504: DeadlineExceededError,
}


def _error_class(status: int) -> type[RewardServerError]:
    if status in _STATUS_ERRORS:
        return _STATUS_ERRORS[status]
    return BadRequestError if 400 <= status < 500 else ServerError


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Usage:
    items: int = 0
    tokens: int = 0
    cache_hits: int = 0
    truncated: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.items + other.items,
            self.tokens + other.tokens,
            self.cache_hits + other.cache_hits,
            self.truncated + other.truncated,
        )


@dataclass(frozen=True)
class ScoreResult:
    """Scores in request order, summed usage, and every model version that answered (one, normally)."""

    scores: list[float]
    model: str | None
    model_versions: tuple[str, ...]
    usage: Usage
    requests: int

    @property
    def model_version(self) -> str | None:
        return self.model_versions[0] if len(self.model_versions) == 1 else None


@dataclass(frozen=True)
class RewardResult:
    """/get_reward's answer: rewards (what a trainer optimizes), scores, and per-item extra logs."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    status: str
    detail: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- the no-I/O core


@dataclass(frozen=True)
class Call:
    """One HTTP request to make (one chunk of a larger call)."""

    method: str
    path: str
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    content: bytes


@dataclass(frozen=True)
class Send:
    call: Call


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Send | Sleep
Outcome = Reply | httpx.TransportError


def _message_dict(message: Message, where: str) -> dict[str, str]:
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise TypeError(f"{where}: a message is a mapping with 'role' and 'content'")
    return {"role": str(message["role"]), "content": message_text(message["content"])}


def message_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [p for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        return "".join(str(p.get("text", "")) for p in parts)
    raise TypeError(f"message content must be text or a list of parts, not {type(content).__name__}")


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(m, Mapping) for m in value)
    )


def to_item(value: ItemLike, index: int = 0) -> dict[str, Any]:
    """One item in any accepted shape -> the API's JSON item."""
    where = f"items[{index}]"
    v: Any = value  # checked shape by shape below
    if isinstance(v, str):
        return {"text": value}
    if isinstance(v, Mapping):
        if "messages" in v:
            return {"messages": [_message_dict(m, where) for m in v["messages"]]}
        if "text" in v:
            return {"text": v["text"]}
        if "prompt" in v and ("response" in v or "completion" in v):
            return to_item((v["prompt"], v.get("response", v.get("completion"))), index)
        raise TypeError(f"{where}: a dict item has 'prompt' and 'response', 'messages', or 'text'")
    if _is_messages(v):
        return {"messages": [_message_dict(m, where) for m in v]}
    if isinstance(v, Sequence) and len(v) == 2:
        prompt, response = v
        if _is_messages(response):  # a conversational completion: [{"role": "assistant", ...}]
            prompt_msgs = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
            return {"messages": [_message_dict(m, where) for m in [*prompt_msgs, *response]]}
        if not isinstance(response, str):
            raise TypeError(f"{where}: a response is text, not {type(response).__name__}")
        if _is_messages(prompt):
            return {"prompt": [_message_dict(m, where) for m in prompt], "response": response}
        if isinstance(prompt, str):
            return {"prompt": prompt, "response": response}
    raise TypeError(
        f"{where}: expected (prompt, response), a dict, a message list or text, not {type(value).__name__}"
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for us; fall back to the backoff schedule


def normalize_base_url(url: str) -> str:
    """Accept the server's root, or a route URL pasted from a trainer config (``.../get_reward``)."""
    url = url.rstrip("/")
    for suffix in _ROUTE_SUFFIXES:
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


class BaseRewardClient:
    """Everything a client decides, none of what it does: no sockets, no sleeping, no threads."""

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
        self, items: Iterable[ItemLike], model: str | None, truncation: str | None
    ) -> list[Call]:
        if isinstance(items, (str, Mapping)):
            raise TypeError("score() takes a list of items, not a single item")
        payload = [to_item(v, i) for i, v in enumerate(items)]
        extra: dict[str, Any] = {}
        if model or self.model:
            extra["model"] = model or self.model
        if truncation or self.truncation:
            extra["truncation"] = truncation or self.truncation
        return [Call("POST", "/v1/score", {"items": payload[s], **extra}) for s in self._chunks(len(payload))]

    def _reward_calls(
        self, queries: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[str] | None
    ) -> list[Call]:
        if isinstance(queries, str):
            raise TypeError("get_reward() takes a list of queries, not one string")
        for name, values in (("prompts", prompts), ("labels", labels)):
            if values is not None and len(values) != len(queries):
                raise ValueError(f"{name} has {len(values)} entries but queries has {len(queries)}")
        calls = []
        for s in self._chunks(len(queries)):
            body: dict[str, Any] = {"query": list(queries[s])}
            if prompts is not None:
                body["prompts"] = list(prompts[s])
            if labels is not None:
                body["labels"] = list(labels[s])
            calls.append(Call("POST", "/get_reward", body))
        return calls

    # -- parsing

    @staticmethod
    def _json(reply: Reply) -> Any:
        try:
            return json.loads(reply.content)
        except ValueError:
            return None

    def _raise_for(self, reply: Reply) -> None:
        if reply.status < 400:
            return
        body = self._json(reply)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            type_, message, rid = err.get("type"), str(err.get("message", "")), err.get("request_id")
        else:  # not ours: a proxy's HTML page, say
            type_, message, rid = None, reply.content[:200].decode("utf-8", "replace"), None
        raise _error_class(reply.status)(
            f"{reply.status} {type_ or 'error'}: {message}",
            status=reply.status,
            type=type_,
            request_id=rid or reply.headers.get("x-request-id"),
            retry_after_s=_retry_after(reply.headers),
        )

    @staticmethod
    def _transport_error(exc: httpx.TransportError) -> RewardServerError:
        if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)):
            return DeadlineExceededError(f"no answer within the client's timeout ({type(exc).__name__})")
        if isinstance(
            exc,
            (
                httpx.ConnectError,
                httpx.ConnectTimeout,
                httpx.ReadError,
                httpx.WriteError,
                httpx.RemoteProtocolError,
                httpx.CloseError,
            ),
        ):
            return ServerConnectionError(f"connection failed: {type(exc).__name__}: {exc}")
        return RewardServerError(f"transport error: {type(exc).__name__}: {exc}")

    @staticmethod
    def _floats(body: Any, key: str, n: int) -> list[float]:
        values = body.get(key) if isinstance(body, dict) else None
        if not isinstance(values, list) or len(values) != n:
            raise ProtocolError(f"the answer's {key!r} is not a list of {n} numbers")
        return [float(v) for v in values]

    def _parse_score(self, call: Call, body: Any) -> ScoreResult:
        assert call.body is not None
        scores = self._floats(body, "scores", len(call.body["items"]))
        u = body.get("usage") or {}
        usage = Usage(
            int(u.get("items", len(scores))),
            int(u.get("tokens", 0)),
            int(u.get("cache_hits", 0)),
            int(u.get("truncated", 0)),
        )
        version = body.get("model_version")
        return ScoreResult(scores, body.get("model"), (version,) if version else (), usage, 1)

    def _parse_reward(self, call: Call, body: Any) -> RewardResult:
        assert call.body is not None
        n = len(call.body["query"])
        extra = body.get("extra_logs") if isinstance(body, dict) else None
        logs = {
            k: [float(x) for x in v] for k, v in (extra or {}).items() if isinstance(v, list) and len(v) == n
        }
        return RewardResult(self._floats(body, "rewards", n), self._floats(body, "scores", n), logs)

    @staticmethod
    def _merge_scores(parts: list[ScoreResult]) -> ScoreResult:
        versions: list[str] = []
        for p in parts:
            versions += [v for v in p.model_versions if v not in versions]
        usage = sum((p.usage for p in parts), Usage())
        model = parts[0].model if parts else None
        return ScoreResult([s for p in parts for s in p.scores], model, tuple(versions), usage, len(parts))

    @staticmethod
    def _merge_rewards(parts: list[RewardResult]) -> RewardResult:
        keys = set.intersection(*(set(p.extra_logs) for p in parts)) if parts else set()
        return RewardResult(
            [r for p in parts for r in p.rewards],
            [s for p in parts for s in p.scores],
            {k: [x for p in parts for x in p.extra_logs[k]] for k in sorted(keys)},
        )

    @staticmethod
    def _parse_health(live: Outcome, ready: Outcome) -> Health:
        is_live = isinstance(live, Reply) and live.status == 200
        if not isinstance(ready, Reply):
            return Health(is_live, False, "unreachable")
        body = BaseRewardClient._json(ready)
        detail = body if isinstance(body, dict) else {}
        return Health(is_live, ready.status == 200, str(detail.get("status", ready.status)), detail)

    # -- retries

    def _retry_delay(self, error: RewardServerError, attempt: int) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None: this error is not retried."""
        if not isinstance(error, (OverloadedError, ServerUnavailableError)):
            return None
        delay = self._rng.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2**attempt))  # full jitter
        if error.retry_after_s is not None:
            delay = max(delay, min(error.retry_after_s, self.max_retry_after_s))
        return delay

    def _exchange(self, call: Call) -> Generator[Step, Outcome | None, Any]:
        """One logical request: send, map errors, back off and resend; returns the parsed JSON."""
        attempt = 0
        while True:
            outcome = yield Send(call)
            try:
                if isinstance(outcome, httpx.TransportError):
                    raise self._transport_error(outcome)
                assert isinstance(outcome, Reply)
                self._raise_for(outcome)
                body = self._json(outcome)
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


def _reply(resp: httpx.Response) -> Reply:
    return Reply(resp.status_code, resp.headers, resp.content)


# ---------------------------------------------------------------- sync


class RewardClient(BaseRewardClient):
    """Blocking client. Long lists go out in chunks, up to ``max_concurrency`` at a time (threads)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout, limits=limits, transport=transport
        )

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> Outcome:
        try:
            return _reply(self._http.request(call.method, call.path, json=call.body))
        except httpx.TransportError as exc:
            return exc

    def _run(self, call: Call) -> Any:
        gen = self._exchange(call)
        step = next(gen)
        try:
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = gen.send(None)
                else:
                    step = gen.send(self._send(step.call))
        except StopIteration as done:
            return done.value

    def _map(self, calls: list[Call], parse: Callable[[Call, Any], T]) -> list[T]:
        def one(call: Call) -> T:
            return parse(call, self._run(call))

        if len(calls) <= 1 or self.max_concurrency == 1:
            return [one(c) for c in calls]
        with ThreadPoolExecutor(min(self.max_concurrency, len(calls)), "rmserve-client") as pool:
            return list(pool.map(one, calls))

    def score_result(
        self, items: Iterable[ItemLike], *, model: str | None = None, truncation: str | None = None
    ) -> ScoreResult:
        calls = self._score_calls(items, model, truncation)
        return self._merge_scores(self._map(calls, self._parse_score))

    def score(
        self, items: Iterable[ItemLike], *, model: str | None = None, truncation: str | None = None
    ) -> list[float]:
        """One raw reward per item, in order."""
        return self.score_result(items, model=model, truncation=truncation).scores

    def get_reward_result(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> RewardResult:
        calls = self._reward_calls(queries, prompts, labels)
        return self._merge_rewards(self._map(calls, self._parse_reward))

    def get_reward(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[float]:
        """OpenRLHF's protocol: one reward per full policy-rendered query, in order."""
        return self.get_reward_result(queries, prompts, labels).rewards

    def models(self) -> list[dict[str, Any]]:
        body = self._run(Call("GET", "/v1/models"))
        return list(body.get("models", [])) if isinstance(body, dict) else []

    def health(self) -> Health:
        """Live and ready, as the server answers them now (no retries)."""
        return self._parse_health(
            self._send(Call("GET", "/health/live")), self._send(Call("GET", "/health/ready"))
        )

    def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> Health:
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.health()
            if health.ready:
                return health
            if time.monotonic() >= deadline:
                raise ServerUnavailableError(f"{self.base_url} not ready in {timeout_s} s: {health.status}")
            time.sleep(poll_s)


# ---------------------------------------------------------------- async


class AsyncRewardClient(BaseRewardClient):
    """The asyncio mirror of ``RewardClient``: chunks run concurrently under a semaphore."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout, limits=limits, transport=transport
        )

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call) -> Outcome:
        try:
            return _reply(await self._http.request(call.method, call.path, json=call.body))
        except httpx.TransportError as exc:
            return exc

    async def _run(self, call: Call) -> Any:
        gen = self._exchange(call)
        step = next(gen)
        try:
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = gen.send(None)
                else:
                    step = gen.send(await self._send(step.call))
        except StopIteration as done:
            return done.value

    async def _map(self, calls: list[Call], parse: Callable[[Call, Any], T]) -> list[T]:
        # A semaphore per call, not per client: asyncio primitives bind to one event loop.
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(call: Call) -> T:
            async with gate:
                return parse(call, await self._run(call))

        tasks = [asyncio.ensure_future(one(c)) for c in calls]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()  # one chunk failed: the call fails, the rest need not finish
            raise

    async def score_result(
        self, items: Iterable[ItemLike], *, model: str | None = None, truncation: str | None = None
    ) -> ScoreResult:
        calls = self._score_calls(items, model, truncation)
        return self._merge_scores(await self._map(calls, self._parse_score))

    async def score(
        self, items: Iterable[ItemLike], *, model: str | None = None, truncation: str | None = None
    ) -> list[float]:
        return (await self.score_result(items, model=model, truncation=truncation)).scores

    async def get_reward_result(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> RewardResult:
        calls = self._reward_calls(queries, prompts, labels)
        return self._merge_rewards(await self._map(calls, self._parse_reward))

    async def get_reward(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[float]:
        return (await self.get_reward_result(queries, prompts, labels)).rewards

    async def models(self) -> list[dict[str, Any]]:
        body = await self._run(Call("GET", "/v1/models"))
        return list(body.get("models", [])) if isinstance(body, dict) else []

    async def health(self) -> Health:
        return self._parse_health(
            await self._send(Call("GET", "/health/live")), await self._send(Call("GET", "/health/ready"))
        )

    async def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> Health:
        deadline = time.monotonic() + timeout_s
        while True:
            health = await self.health()
            if health.ready:
                return health
            if time.monotonic() >= deadline:
                raise ServerUnavailableError(f"{self.base_url} not ready in {timeout_s} s: {health.status}")
            await asyncio.sleep(poll_s)
