"""Facts other people's code relies on, shared by the tests that check them."""

from __future__ import annotations

# docs/api.md, "Metrics": the names the dashboard, the alerts and users' scrapes may rely on.
DOCUMENTED_METRICS = frozenset(
    {
        "rmserve_requests_total",
        "rmserve_request_duration_seconds",
        "rmserve_queue_depth",
        "rmserve_queue_wait_seconds",
        "rmserve_tokenize_duration_seconds",
        "rmserve_inference_duration_seconds",
        "rmserve_batch_size",
        "rmserve_batch_tokens",
        "rmserve_items_scored_total",
        "rmserve_cache_lookups_total",
        "rmserve_model_info",
        "rmserve_prefix_tokens_reused_total",
        "rmserve_prefix_lookups_total",
        "rmserve_prefix_evictions_total",
        "rmserve_prefix_cache_bytes",
    }
)
