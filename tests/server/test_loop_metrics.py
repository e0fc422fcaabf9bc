"""Loop-owned metrics export exactly what prometheus_client's own would for the same updates."""

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from scalellm_jax.server.loop_metrics import LoopMetrics

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.5, 1.0, 2.5)


def _samples(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without the _created samples (prometheus_client adds them; loop metrics have none)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_histogram_and_counter_match_prometheus_client():
    rng = random.Random()
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopMetrics(ours)
    hist = loop.histogram("x_latency_seconds", "Latency.", BUCKETS)
    count = loop.counter("x_tokens", "Tokens.")
    ref_hist = Histogram("x_latency_seconds", "Latency.", buckets=BUCKETS, registry=theirs)
    ref_count = Counter("x_tokens", "Tokens.", registry=theirs)
    assert _samples(ours) == _samples(theirs)  # empty
    # values on the bounds themselves (le is inclusive), between, below all and above all
    values = [*BUCKETS, 0.0, 1e-9, 7.0, *(rng.uniform(0, 3) for _ in range(300))]
    for value in values:
        times = rng.randint(1, 4)
        hist.observe(value, times)
        for _ in range(times):
            ref_hist.observe(value)
        count.inc(times)
        ref_count.inc(times)
    mine, ref = _samples(ours), _samples(theirs)
    sums = [line for line in mine if line.startswith("x_latency_seconds_sum")]
    ref_sums = [line for line in ref if line.startswith("x_latency_seconds_sum")]
    assert float(sums[0].split()[1]) == pytest.approx(float(ref_sums[0].split()[1]), rel=1e-12)
    assert [line for line in mine if line not in sums] == [line for line in ref if line not in ref_sums]


def test_bucket_bounds_must_increase():
    with pytest.raises(ValueError, match="strictly increasing"):
        LoopMetrics(CollectorRegistry()).histogram("y", "Y.", (0.1, 0.05))
