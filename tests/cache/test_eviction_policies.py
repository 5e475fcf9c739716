"""Eviction policies (cache/eviction.py) and the offline simulator of benchmark 4.

Properties of the policies themselves, then small deterministic replays through the same
simulator the benchmark uses (benchmarks/cache_eviction.py), which evicts as the index
does: sorted by priority, lowest first, between two watermarks, clock advanced per
eviction, access counts forgotten on eviction. No wall-clock figure is asserted.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stashflow.cache.eviction import LFUDA, LRU, POLICIES, EvictionPolicy, make_policy

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_eviction.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cache_eviction_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def evict_order(policy: EvictionPolicy, accesses: list[tuple[str, int, float]]) -> list[str]:
    """Objects in eviction order, given (name, hits, last access) of their latest access."""
    ranked = sorted(
        (policy.priority(hits=hits, last_access=t, clock=0.0), t, name)
        for name, hits, t in accesses
    )
    return [name for _, _, name in ranked]


# ---------------------------------------------------------------------------- policies


def test_policies_are_registered_under_their_names() -> None:
    assert set(POLICIES) == {"lru", "lfuda"}
    for name in POLICIES:
        assert make_policy(name).name == name


def test_make_policy_rejects_an_unknown_name_and_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown eviction policy 'arc'.*lru.*lfuda"):
        make_policy("arc")


def test_lru_evicts_the_least_recently_used_first() -> None:
    order = evict_order(LRU(), [("b", 50, 20.0), ("a", 1, 10.0), ("c", 1, 30.0)])
    assert order == ["a", "b", "c"]  # the count does not matter, only recency


def test_lfuda_evicts_the_least_frequently_used_first_at_one_clock() -> None:
    order = evict_order(LFUDA(), [("hot", 9, 1.0), ("once", 1, 3.0), ("twice", 2, 2.0)])
    assert order == ["once", "twice", "hot"]


def test_lfuda_keeps_a_re_read_object_over_later_one_off_objects() -> None:
    policy = LFUDA()
    clock = 0.0
    hot = policy.priority(hits=4, last_access=0.0, clock=clock)
    # a scan: many eviction passes of one-off objects, each lifting the clock
    for _ in range(30):
        one_off = policy.priority(hits=1, last_access=1.0, clock=clock)
        assert one_off < hot
        clock = policy.advance(clock, one_off)
    assert clock < hot


def test_lfuda_handles_the_zero_count_of_a_record_just_created() -> None:
    # the index ranks a new record with hits=0 until its first access is applied
    policy = LFUDA()
    assert policy.priority(hits=0, last_access=0.0, clock=5.0) == policy.priority(
        hits=1, last_access=0.0, clock=5.0
    )


def test_lfuda_rejects_a_weight_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="weight"):
        LFUDA(weight=0)


@pytest.mark.parametrize("name", sorted(POLICIES))
@given(
    evicted=st.lists(
        st.floats(min_value=-1e9, max_value=1e9, allow_nan=False), min_size=1, max_size=50
    )
)
def test_the_clock_never_goes_back(name: str, evicted: list[float]) -> None:
    policy = make_policy(name)
    clock = 0.0
    for priority in evicted:
        after = policy.advance(clock, priority)
        assert after >= clock
        clock = after


@given(
    hits=st.integers(min_value=0, max_value=10**6),
    clock=st.floats(min_value=0, max_value=1e12, allow_nan=False),
)
def test_lfuda_priority_is_above_the_clock_and_grows_with_the_count(
    hits: int, clock: float
) -> None:
    policy = LFUDA()
    now = policy.priority(hits=hits, last_access=0.0, clock=clock)
    assert now > clock
    assert policy.priority(hits=hits + 1, last_access=0.0, clock=clock) >= now


@given(
    requests=st.lists(st.integers(0, 5), min_size=1, max_size=200),
    sizes=st.lists(st.integers(1, 100), min_size=6, max_size=6),
)
def test_replayed_clock_is_monotonic(
    bench: ModuleType, requests: list[int], sizes: list[int]
) -> None:
    # the clock handed to priority() over a whole replay never decreases
    seen: list[float] = []

    class Spy(LFUDA):
        def priority(self, *, hits: int, last_access: float, clock: float) -> float:
            seen.append(clock)
            return super().priority(hits=hits, last_access=last_access, clock=clock)

    bench.simulate_policy(Spy(), requests, sizes, 150)
    assert seen == sorted(seen)


# ---------------------------------------------------------------------------- replays


def hot_set_and_scans(*, rounds: int, hot: int, reads: int, scan: int) -> list[int]:
    """Each round: the objects 0..hot-1 read `reads` times over, then `scan` fresh objects."""
    requests: list[int] = []
    fresh = hot
    for _ in range(rounds):
        requests.extend(list(range(hot)) * reads)
        requests.extend(range(fresh, fresh + scan))
        fresh += scan
    return requests


def test_a_scan_flushes_lru_but_not_lfuda(bench: ModuleType) -> None:
    # unit sizes: 20 hot objects read 4 times a round, in a cache of 100, and a scan of
    # one cache size per round
    rounds, hot, reads = 20, 20, 4
    requests = hot_set_and_scans(rounds=rounds, hot=hot, reads=reads, scan=100)
    sizes = [1] * (max(requests) + 1)
    lru = bench.simulate_policy(make_policy("lru"), requests, sizes, 100, 0.95)[0]
    lfuda = bench.simulate_policy(make_policy("lfuda"), requests, sizes, 100, 0.95)[0]
    # LRU: every scan pushed the hot set out, whose first read of each round misses
    assert lru == rounds * hot * (reads - 1)
    # lfuda: the hot set stayed through the scans, from the second round on
    assert lfuda == lru + (rounds - 1) * hot


def test_lfuda_beats_lru_on_a_small_zipf_trace_with_scans(bench: ModuleType) -> None:
    traces = {
        t.name: t
        for t in bench.make_traces(
            seed=7,
            requests=40_000,
            objects=1_000,
            alpha=0.9,
            scan_every=2_000,
            scan_fraction=0.25,
            scan_spread=0.5,
            shift_every=20_000,
        )
    }
    trace = traces[bench.SCAN_TRACE]
    capacity = int(0.10 * trace.working_set)

    def byte_hit_ratio(name: str) -> float:
        if name == bench.BELADY:
            _, requested, hit_bytes, _ = bench.simulate_belady(
                trace.requests, trace.sizes, capacity
            )
        else:
            _, requested, hit_bytes, _ = bench.simulate_policy(
                make_policy(name), trace.requests, trace.sizes, capacity
            )
        return float(hit_bytes / requested)

    lru, lfuda, belady = (byte_hit_ratio(n) for n in ("lru", "lfuda", bench.BELADY))
    assert lfuda > lru + 0.05
    assert belady > lfuda


def test_belady_is_optimal_for_unit_sizes(bench: ModuleType) -> None:
    rng = random.Random(3)
    requests = [min(int(rng.paretovariate(1.0)), 60) for _ in range(3_000)]
    sizes = [1] * 61
    best = bench.simulate_belady(requests, sizes, 10)[0]
    for name in POLICIES:
        assert bench.simulate_policy(make_policy(name), requests, sizes, 10, 1.0)[0] <= best
    # and no cache does better than every request after the first of each object
    assert best <= len(requests) - len(set(requests))


def test_counts_are_forgotten_on_eviction(bench: ModuleType) -> None:
    # object 0 is read 5 times, evicted by a scan far longer than it can outlive, then
    # read again: the index dropped its record, so it comes back with a count of 1
    seen: dict[int, list[int]] = {}

    class Spy(LFUDA):
        def priority(self, *, hits: int, last_access: float, clock: float) -> float:
            seen.setdefault(int(last_access), []).append(hits)
            return super().priority(hits=hits, last_access=last_access, clock=clock)

    requests = [0] * 5 + list(range(2, 5_002)) + [0]
    sizes = [1] * 5_002
    bench.simulate_policy(Spy(), requests, sizes, 20, 0.95)
    assert seen[len(requests) - 1] == [1]


def test_markdown_section_is_replaced_and_the_rest_kept(bench: ModuleType, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    bench.update_markdown(doc, "first")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n")
    doc.write_text(text + "\n## Other benchmark\n\nkept\n")
    bench.update_markdown(doc, "second")
    text = doc.read_text()
    assert text.count(bench.SECTION) == 1
    assert "second" in text and "first" not in text
    assert text.endswith("## Other benchmark\n\nkept\n")
