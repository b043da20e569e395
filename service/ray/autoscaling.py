"""Ray Serve autoscaling on the work a reward server holds: items, not requests.

A trainer sends one request per sample, or 2,000 samples in one request; counting requests (Ray's
default policy) would see the second as idle. Each replica reports the items it has accepted and not
yet scored (``record_autoscaling_stats`` in ``rmserve.ray.deployment``); Ray averages each replica's
reports over ``look_back_period_s``. This policy wants enough replicas for every replica to hold
``target_items_per_replica``. Requests Ray holds in its proxies before any replica took them count
one item each (their size is not known there). Ray applies the bounds, the up/down delays and the
scaling factors to what this returns.

Ray pickles this module by value into its controller: it imports nothing but the standard library.
"""

from __future__ import annotations

from typing import Any


class QueuedItemsPolicy:
    """Ray Serve's ``AutoscalingPolicy.policy_function`` (a class: Ray passes it ``policy_kwargs``)."""

    def __init__(self, metric: str, target_items_per_replica: float) -> None:
        self.metric = metric
        self.target = float(target_items_per_replica)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """The replicas wanted for ``ctx`` (Ray's ``AutoscalingContext``) and the policy's state."""
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}  # starting, or scaled to zero: Ray's cold start decides
        reported = (ctx.aggregated_metrics or {}).get(self.metric, {})
        items = sum(reported.values()) + (ctx.total_queued_requests or 0.0)
        return items / self.target, {}  # a fraction: Ray rounds it up
