"""Batched latency observations (cache/metrics.py) must expose exactly what the same
observations made one by one would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from stashflow.cache.metrics import BatchedObservations

BUCKETS = (0.0005, 0.001, 0.0025, 0.01, 1)
# on a bound, between bounds, below the first, beyond the last (+Inf)
AMOUNTS = [0.0005, 0.0007, 0.00001, 0.001, 0.003, 0.3, 1.0, 7.5, 0.0005, 42.0]


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("t_seconds", "t", ["result"], buckets=BUCKETS, registry=registry)


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    lines = [
        line.rpartition(" ")
        for line in generate_latest(registry).decode().splitlines()
        if line.startswith("t_seconds") and "_created" not in line
    ]
    return {name: float(value) for name, _, value in lines}


def test_a_flushed_batch_equals_the_same_observations_one_by_one() -> None:
    one_reg, one = _histogram()
    for amount in AMOUNTS:
        one.labels("hit").observe(amount)
    batch_reg, batched = _histogram()
    batch = BatchedObservations(batched.labels("hit"))
    for amount in AMOUNTS[:4]:
        batch.observe(amount)
    batch.flush()
    for amount in AMOUNTS[4:]:
        batch.observe(amount)
    assert _samples(batch_reg) != _samples(one_reg)  # not yet flushed
    batch.flush()
    batch.flush()  # nothing new: adds nothing
    got, want = _samples(batch_reg), _samples(one_reg)
    assert got.keys() == want.keys()
    for name, value in want.items():  # the sum is added in another order
        assert got[name] == pytest.approx(value, rel=1e-12), name
    assert got['t_seconds_count{result="hit"}'] == 10
    assert got['t_seconds_bucket{le="0.0005",result="hit"}'] == 3
