"""Every Prometheus metric of the service, in base units, on a registry of the app's own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 1 ms: trainers send one-item requests that finish in a few milliseconds.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITEMS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "rmserve_requests", "HTTP requests by route and status", ["route", "code"], registry=r
        )
        self.request_duration = Histogram(
            "rmserve_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_depth = Gauge("rmserve_queue_depth", "items waiting for a forward pass", registry=r)
        self.queue_wait = Histogram(
            "rmserve_queue_wait_seconds",
            "time an item waited for its forward pass",
            buckets=_SECONDS,
            registry=r,
        )
        self.tokenize_duration = Histogram(
            "rmserve_tokenize_duration_seconds",
            "time to format and tokenize a request",
            buckets=_SECONDS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "rmserve_inference_duration_seconds", "time of one forward pass", buckets=_SECONDS, registry=r
        )
        self.batch_size = Histogram(
            "rmserve_batch_size", "items per forward pass", buckets=_ITEMS, registry=r
        )
        self.batch_tokens = Histogram(
            "rmserve_batch_tokens", "padded tokens per forward pass", buckets=_TOKENS, registry=r
        )
        self.items_scored = Counter(
            "rmserve_items_scored", "items scored by the model", ["model"], registry=r
        )
        self.cache_lookups = Counter(
            "rmserve_cache_lookups", "score cache lookups by result", ["result"], registry=r
        )
        self.model_info = Gauge(
            "rmserve_model_info", "loaded bundles", ["model", "version", "provider", "precision"], registry=r
        )
        self.ready = Gauge("rmserve_ready", "1 when every bundle is loaded and warm, else 0", registry=r)
        self.inference_errors = Counter(
            "rmserve_inference_errors", "forward passes that failed", ["model"], registry=r
        )
        self.cache_dropped_writes = Counter(
            "rmserve_cache_dropped_writes",
            "score cache writes dropped, by reason: redis_full, buffer_full, circuit_open, error",
            ["reason"],
            registry=r,
        )
        self.prefix_tokens_reused = Counter(
            "rmserve_prefix_tokens_reused",
            "tokens not computed again because a cached or shared prefix held them",
            ["model"],
            registry=r,
        )
        self.prefix_lookups = Counter(
            "rmserve_prefix_lookups",
            "items looked up in the prefix cache: hit (started from a cached prefix) or miss",
            ["model", "result"],
            registry=r,
        )
        self.prefix_evictions = Counter(
            "rmserve_prefix_evictions",
            "cached prefixes dropped, by reason: budget, ttl, superseded (a longer one holds it)",
            ["model", "reason"],
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "rmserve_prefix_cache_bytes",
            "bytes of keys and values in the prefix cache",
            ["model"],
            registry=r,
        )
        for reason in ("redis_full", "buffer_full", "circuit_open", "error"):
            self.cache_dropped_writes.labels(reason=reason)
        for result in ("hit", "miss", "error"):
            self.cache_lookups.labels(result=result)

    def prefix_events(self, model: str) -> Callable[[str, int], None]:
        """The prefix cache's counter for ``model`` (rmserve.engines.prefixes: ``Counter``)."""
        for result in ("hit", "miss"):
            self.prefix_lookups.labels(model=model, result=result)
        for reason in ("budget", "ttl", "superseded"):
            self.prefix_evictions.labels(model=model, reason=reason)
        self.prefix_tokens_reused.labels(model=model)
        self.prefix_cache_bytes.labels(model=model).set(0)

        def count(event: str, amount: int) -> None:
            if event == "reused":
                self.prefix_tokens_reused.labels(model=model).inc(amount)
            elif event in ("hit", "miss"):
                self.prefix_lookups.labels(model=model, result=event).inc(amount)
            elif event == "bytes":
                self.prefix_cache_bytes.labels(model=model).set(amount)
            elif event.startswith("evicted:"):
                self.prefix_evictions.labels(model=model, reason=event.removeprefix("evicted:")).inc(amount)

        return count

    def render(self) -> bytes:
        return generate_latest(self.registry)
