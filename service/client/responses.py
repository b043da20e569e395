"""The server's answers -> results or errors: status mapping, body checks, merging chunk answers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from rmserve.client.errors import (
    DeadlineExceededError,
    ProtocolError,
    RewardServerError,
    ServerConnectionError,
    ServerUnavailableError,
    error_class,
)
from rmserve.client.results import Health, RewardResult, ScoreResult, Usage
from rmserve.client.steps import Call, Outcome, Reply


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for us; fall back to the backoff schedule


def json_body(reply: Reply) -> Any:
    try:
        return json.loads(reply.content)
    except ValueError:
        return None


def raise_for(reply: Reply) -> None:
    if reply.status < 400:
        return
    body = json_body(reply)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        type_, message, rid = err.get("type"), str(err.get("message", "")), err.get("request_id")
        cls = error_class(reply.status)
    else:  # not ours: a proxy's HTML page, say
        type_, message, rid = None, reply.content[:200].decode("utf-8", "replace"), None
        # A proxy's own 500 (Ray Serve's, when the replica it forwarded to died mid-request) means
        # the server behind it was lost, as a 502 does: retried. rmserve's 500s carry its error body.
        cls = ServerUnavailableError if reply.status == 500 else error_class(reply.status)
    raise cls(
        f"{reply.status} {type_ or 'error'}: {message}",
        status=reply.status,
        type=type_,
        request_id=rid or reply.headers.get("x-request-id"),
        retry_after_s=_retry_after(reply.headers),
    )


_CONNECTION_FAILURES = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.CloseError,
)


def transport_error(exc: httpx.TransportError) -> RewardServerError:
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)):
        return DeadlineExceededError(f"no answer within the client's timeout ({type(exc).__name__})")
    if isinstance(exc, _CONNECTION_FAILURES):
        return ServerConnectionError(f"connection failed: {type(exc).__name__}: {exc}")
    return RewardServerError(f"transport error: {type(exc).__name__}: {exc}")


def _floats(body: Any, key: str, n: int) -> list[float]:
    values = body.get(key) if isinstance(body, dict) else None
    if not isinstance(values, list) or len(values) != n:
        raise ProtocolError(f"the answer's {key!r} is not a list of {n} numbers")
    return [float(v) for v in values]


def _step_lists(body: Any, n: int) -> list[list[float]] | None:
    values = body.get("step_scores") if isinstance(body, dict) else None
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != n or not all(isinstance(v, list) for v in values):
        raise ProtocolError(f"the answer's 'step_scores' is not {n} lists of numbers")
    return [[float(x) for x in v] for v in values]


def _named_lists(body: Any, key: str, n: int) -> dict[str, list[float]] | None:
    """``{name: [float per item]}`` (a composite's components), or None when the answer has none."""
    values = body.get(key) if isinstance(body, dict) else None
    if values is None:
        return None
    if not isinstance(values, dict) or not all(isinstance(v, list) and len(v) == n for v in values.values()):
        raise ProtocolError(f"the answer's {key!r} is not a mapping of names to lists of {n} numbers")
    return {str(k): [float(x) for x in v] for k, v in values.items()}


def parse_score(call: Call, body: Any) -> ScoreResult:
    assert call.body is not None
    n = len(call.body["items"])
    scores = _floats(body, "scores", n)
    u = body.get("usage") or {}
    usage = Usage(
        int(u.get("items", len(scores))),
        int(u.get("tokens", 0)),
        int(u.get("cache_hits", 0)),
        int(u.get("truncated", 0)),
        int(u.get("dropped_parts", 0)),
        int(u.get("steps_dropped") or 0),
        tuple(str(s) for s in u.get("skipped") or ()),
    )
    version = body.get("model_version")
    return ScoreResult(
        scores,
        body.get("model"),
        (version,) if version else (),
        usage,
        1,
        _step_lists(body, n),
        _named_lists(body, "components", n),
        _named_lists(body, "normalized", n),
    )


def parse_steps(call: Call, body: Any) -> ScoreResult:
    """A score answer that must carry step scores (``score_steps``: a process reward model)."""
    result = parse_score(call, body)
    if result.step_scores is None:
        model = body.get("model") if isinstance(body, dict) else None
        raise ProtocolError(f"model {model!r} answered without step_scores: it is not a process reward model")
    return result


def parse_reward(call: Call, body: Any) -> RewardResult:
    assert call.body is not None
    n = len(call.body["query"])
    extra = body.get("extra_logs") if isinstance(body, dict) else None
    logs = {k: [float(x) for x in v] for k, v in (extra or {}).items() if isinstance(v, list) and len(v) == n}
    return RewardResult(_floats(body, "rewards", n), _floats(body, "scores", n), logs, _step_lists(body, n))


def merge_scores(parts: list[ScoreResult]) -> ScoreResult:
    versions: list[str] = []
    for p in parts:
        versions += [v for v in p.model_versions if v not in versions]
    usage = sum((p.usage for p in parts), Usage())
    model = parts[0].model if parts else None
    scores = [s for p in parts for s in p.scores]
    steps = [p.step_scores for p in parts]
    merged = [s for part in steps for s in part or []] if parts and None not in steps else None
    return ScoreResult(
        scores,
        model,
        tuple(versions),
        usage,
        len(parts),
        merged,
        _merge_named([p.components for p in parts]),
        _merge_named([p.normalized for p in parts]),
    )


def _merge_named(parts: list[dict[str, list[float]] | None]) -> dict[str, list[float]] | None:
    """Chunks' ``{name: values}`` joined in order: the names every chunk answered."""
    if not parts or any(p is None for p in parts):
        return None
    given = [p for p in parts if p is not None]
    names = [k for k in given[0] if all(k in p for p in given)]
    return {k: [x for p in given for x in p[k]] for k in names}


def merge_rewards(parts: list[RewardResult]) -> RewardResult:
    keys = set.intersection(*(set(p.extra_logs) for p in parts)) if parts else set()
    steps = [p.step_scores for p in parts]
    return RewardResult(
        [r for p in parts for r in p.rewards],
        [s for p in parts for s in p.scores],
        {k: [x for p in parts for x in p.extra_logs[k]] for k in sorted(keys)},
        [s for part in steps for s in part or []] if parts and None not in steps else None,
    )


def parse_health(live: Outcome, ready: Outcome) -> Health:
    is_live = isinstance(live, Reply) and live.status == 200
    if not isinstance(ready, Reply):
        return Health(is_live, False, "unreachable")
    body = json_body(ready)
    detail = body if isinstance(body, dict) else {}
    return Health(is_live, ready.status == 200, str(detail.get("status", ready.status)), detail)
