"""Prefix affinity on Ray Serve: requests with one ``x-prefix-key`` go to one replica.

rmserve's client and trainer adapters send ``x-prefix-key``, a hash of the request's prompt
(rmserve.client.base), so the members of a GRPO group, sent as separate requests, can reach the
replica whose prefix cache already holds their prompt (docs/prefix-reuse.md). This is a Ray Serve
request router (Ray 2.60: ``ray.serve.request_router.RequestRouter``, the public extension surface
in ray/serve/request_router.py, configured through ``RequestRouterConfig.request_router_class`` in
ray/serve/config.py): ``choose_replicas`` returns ranks of replicas, most preferred first, and Ray
sends the request to the first ranked replica with room (ray/serve/_private/request_router/
request_router.py, ``choose_replicas``).

The ranks are rendezvous hashing of the key over the replicas' ids: each replica's weight is a hash
of (key, replica id), highest first. Adding or removing a replica moves only the keys it gains or
held, and a full replica passes its requests to the next in the key's own order. A request without
the header (another client, a health check) keeps Ray's default power-of-two-choices behaviour: all
replicas as one rank, chosen among at random. The key only routes: the scores are the same on
every replica.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Iterable
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from rmserve.client.base import PREFIX_HEADER

_HEADER = PREFIX_HEADER.encode()


def _from_headers(headers: Iterable[Any]) -> str | None:
    for pair in headers:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            continue
        name, value = pair
        name = name.encode() if isinstance(name, str) else name
        if isinstance(name, bytes) and name.lower() == _HEADER:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def prefix_key(args: Iterable[Any]) -> str | None:
    """The ``x-prefix-key`` of a request as Ray holds it: an HTTP request from Ray's proxy (an object
    with its ASGI scope, which the proxy sends pickled: ray/serve/_private/proxy_request_response.py,
    ``serialized_replica_arg``), or a handle call of ``RMServeReplica.handle_request`` (method, path,
    headers, body)."""
    for arg in args:
        if isinstance(arg, bytes):
            try:
                arg = pickle.loads(arg)  # Ray's own proxy wrote it, inside the cluster
            except Exception:  # not the proxy's request: no key
                continue
        scope = getattr(arg, "asgi_scope", None)
        if isinstance(scope, dict):
            return _from_headers(scope.get("headers", ()))
        if isinstance(arg, list):
            found = _from_headers(arg)
            if found is not None:
                return found
    return None


def rank(key: str, replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
    """One replica per rank, in the key's rendezvous order."""

    def weight(replica: RunningReplica) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica.replica_id.unique_id}".encode(), digest_size=8).digest()

    return [[r] for r in sorted(replicas, key=weight, reverse=True)]


class PrefixKeyRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = prefix_key(pending_request.args) if pending_request is not None else None
        if key is None or not candidate_replicas:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        return rank(key, candidate_replicas)
