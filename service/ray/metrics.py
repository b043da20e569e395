"""A replica's rmserve metrics, copied into Ray's metrics: one series per replica in the cluster's
Prometheus, beside Ray Serve's own.

``/metrics`` through Ray's proxy answers for whichever replica the request reached. Ray's metrics
agent on every node exports what replicas record through ``ray.serve.metrics``, tagged with their
``application``, ``deployment`` and ``replica`` and named with a ``ray_`` prefix
(``ray_rmserve_items_scored_total{replica="..."}``); Ray lists those endpoints for Prometheus
(``/tmp/ray/prom_metrics_service_discovery.json``). Every ``period_s`` each sample of the replica's
registry (a counter's total, a histogram's buckets, sum and count) is set as a Ray gauge of the
same name and labels, so ``rate()`` and ``histogram_quantile()`` read them as they read ``/metrics``.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry
from ray.serve.metrics import Gauge


class RayMetricsCopy:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.gauges: dict[str, Gauge] = {}

    def copy(self) -> None:
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # when a series began: not a value to plot
                    continue
                gauge = self.gauges.get(sample.name)
                if gauge is None:
                    keys = tuple(sorted(sample.labels))
                    # (Ray annotates tag_keys as a one-tuple; any tuple of names is what it takes)
                    gauge = Gauge(sample.name, description=family.documentation, tag_keys=keys)  # type: ignore[arg-type]
                    self.gauges[sample.name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))

    async def run(self, period_s: float = 5.0) -> None:
        while True:
            self.copy()
            await asyncio.sleep(period_s)
