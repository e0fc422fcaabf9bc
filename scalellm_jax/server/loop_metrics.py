"""Prometheus histograms and counters that only the event loop's thread updates and reads.

The per-token metrics (inter-token latency, generated tokens) are updated once per token of
every stream. ``prometheus_client``'s own metrics take a lock on every update, since any thread
may update them, and on a busy host that was a measurable share of the event loop's CPU per
token (README, "HTTP overhead"). These are updated by the loop and rendered by the loop's
``/metrics`` handler, so they need no lock; they export the same text as ``prometheus_client``'s
(the tests compare the two).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class LoopHistogram:
    """A histogram with fixed bucket bounds (each ``le`` inclusive, as Prometheus defines them)."""

    __slots__ = ("name", "documentation", "_bounds", "_counts", "_sum")

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]):
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"{name}: bucket bounds must be strictly increasing")
        self.name, self.documentation = name, documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` ``times`` times (one call for several tokens that arrived together)."""
        self._counts[bisect.bisect_left(self._bounds, value)] += times
        self._sum += value * times

    def family(self) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))
        return HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self._sum)


class LoopCounter:
    __slots__ = ("name", "documentation", "value")

    def __init__(self, name: str, documentation: str):
        self.name, self.documentation = name, documentation
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, value=self.value)


class LoopMetrics(Collector):
    """The loop-owned metrics of one registry."""

    def __init__(self, registry: CollectorRegistry):
        self._metrics: list[LoopHistogram | LoopCounter] = []
        registry.register(self)

    def histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> LoopHistogram:
        return self._add(LoopHistogram(name, documentation, buckets))

    def counter(self, name: str, documentation: str) -> LoopCounter:
        return self._add(LoopCounter(name, documentation))

    def _add(self, metric):
        self._metrics.append(metric)
        return metric

    def collect(self):
        for metric in self._metrics:
            yield metric.family()
