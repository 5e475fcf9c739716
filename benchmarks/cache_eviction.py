"""Benchmark 4 of the cache: byte hit ratio of the eviction policies on synthetic traces.

Every policy in `stashflow.cache.eviction.POLICIES` is replayed, together with Belady's
offline optimum and, for reference, the textbook LFU-DA (priority = clock + hits, which
`lfuda` refines), on deterministic synthetic traces of objects with sizes.

Traces (one catalogue per seed; figures are means over `--seeds` catalogues, because with
heavy-tailed sizes one catalogue can give a single popular 64 MiB object a third of all
requested bytes):

- `zipf`: `--requests` requests drawn from a Zipf(`--alpha`, 0.9) popularity over
  `--objects` (10,000) objects. Sizes are log-normal (median 1 MiB, sigma 1.5) clipped to
  [64 KiB, 64 MiB] and independent of popularity.
- `zipf+scans` (the scan trace of the issue): the same requests and, in every period of
  `--scan-every` (10,000) of them, one one-off scan: objects read once and never again (a
  job, or a campaign of jobs, streaming through a dataset), from the same size distribution,
  `--scan-fraction` (25%) of the Zipf working set per scan: 2.5 times the largest default
  cache, so one scan alone could flush it; scans are about a fifth of the requested bytes.
  The cache serves other clients while a scan runs, so a scan's requests are interleaved at
  random with the Zipf requests of the first `--scan-spread` (half) of its period.
- `zipf+burst-scans`: the same scans read back to back with no other request in between
  (the harshest reading of "periodic scans", for comparison).
- `zipf-shift`: the Zipf requests with the popularity ranking reshuffled every
  `--shift-every` (100,000) requests (new datasets become popular, old ones go cold): a
  check that a frequency policy still ages out a formerly hot set.

The cache is simulated as the real index runs it (cache/index.py, cache/service.py):
objects sorted by the policy's priority; when an insertion takes disk use above the high
watermark (the cache size here) the lowest priorities are evicted until use is under the
low watermark (`--low-watermark`, as a fraction of the high one: 0.90/0.95 by default, the
defaults of cache/config.py and XCache's usual `pfc.diskusage 0.90 0.95`), the policy clock
advanced by `advance()` with each eviction. An object's access count starts at 1 when it is
fetched and counts each hit while it is cached; it does NOT survive eviction, because the
index drops an evicted object's record (a re-fetched object starts again at 1). The object
just fetched is in the index like any other and may be the first one out. Equal priorities
leave in order of access (older first). An object larger than the cache bypasses it. The
`last_access` passed to the policy is the request number.

Belady's optimum is computed offline with precomputed next-use indices: on a miss the object
is admitted and, while the cache is over its size, the cached object (possibly the new one)
whose next use is farthest in the future leaves; it uses the whole cache size (no watermark
gap). With variable sizes this is the usual practical approximation: the exact byte-optimal
offline policy is NP-hard, so the figure is a reference, not a strict bound.

Reported per trace, cache size (a fraction of the bytes of the Zipf catalogue) and policy:
byte hit ratio (hit bytes / requested bytes: the origin traffic saved, the figure we care
about) and object hit ratio; then the locality policy minus LRU in points.

Run: .venv/bin/python benchmarks/cache_eviction.py --output-md docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import heapq
import math
import multiprocessing
import os
import platform
import random
import shlex
import statistics
import sys
import time
from array import array
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from stashflow.cache.eviction import POLICIES, EvictionPolicy, make_policy

KIB = 1024
MIB = 1024 * KIB
MIN_SIZE = 64 * KIB
MAX_SIZE = 64 * MIB
MEDIAN_SIZE = 1 * MIB
SIZE_SIGMA = 1.5

LOCALITY = "lfuda"  # the locality-aware policy of the cache, compared with LRU
BELADY = "belady"
TEXTBOOK = "lfuda-textbook"
SCAN_TRACE = "zipf+scans"
TARGET_POINTS = 10.0  # the issue: the locality policy beats LRU by >= 10 points there
SECTION = "## Eviction policies (benchmark 4)"


@dataclass(frozen=True)
class Trace:
    name: str
    seed: int
    requests: array[int]  # object ids in request order (an array: 4 bytes a request)
    sizes: list[int]  # bytes, indexed by object id
    working_set: int  # bytes of the Zipf catalogue (the objects that are re-read)


@dataclass(frozen=True)
class Result:
    trace: str
    seed: int
    cache_fraction: float
    policy: str
    requests: int
    hits: int
    requested_bytes: int
    hit_bytes: int
    evictions: int

    @property
    def byte_hit_ratio(self) -> float:
        return self.hit_bytes / self.requested_bytes if self.requested_bytes else 0.0

    @property
    def object_hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


# ---------------------------------------------------------------------------- traces


def draw_sizes(rng: random.Random, count: int) -> list[int]:
    """`count` log-normal sizes (median 1 MiB, sigma 1.5) clipped to [64 KiB, 64 MiB]."""
    mu = math.log(MEDIAN_SIZE)
    return [
        min(MAX_SIZE, max(MIN_SIZE, round(rng.lognormvariate(mu, SIZE_SIGMA))))
        for _ in range(count)
    ]


def zipf_requests(rng: random.Random, objects: int, alpha: float, count: int) -> list[int]:
    """`count` ids in [0, objects); id k is drawn with probability proportional to (k+1)^-alpha."""
    cumulative: list[float] = []
    total = 0.0
    for rank in range(1, objects + 1):
        total += rank**-alpha
        cumulative.append(total)
    return rng.choices(range(objects), cum_weights=cumulative, k=count)


def interleave(rng: random.Random, first: Sequence[int], second: Sequence[int]) -> list[int]:
    """A uniformly random interleaving of two sequences, each keeping its own order."""
    picks = [False] * len(first) + [True] * len(second)
    rng.shuffle(picks)
    a, b = iter(first), iter(second)
    return [next(b) if pick else next(a) for pick in picks]


def make_traces(
    *,
    seed: int,
    requests: int,
    objects: int,
    alpha: float,
    scan_every: int,
    scan_fraction: float,
    scan_spread: float,
    shift_every: int,
) -> list[Trace]:
    """The four traces of one catalogue (see the module docstring)."""
    rng = random.Random(seed)
    sizes = draw_sizes(rng, objects)
    working_set = sum(sizes)
    zipf = zipf_requests(rng, objects, alpha, requests)

    all_sizes = list(sizes)  # the catalogue, then the one-off objects of the scans
    scans = array("I")  # interleaved with the other clients' requests
    bursts = array("I")  # the same scans, read with nothing else in between
    scan_bytes = scan_fraction * working_set
    for start in range(0, requests, scan_every):
        period = zipf[start : start + scan_every]
        if len(period) < scan_every or scan_fraction <= 0:
            scans.extend(period)  # no scan in a partial period
            bursts.extend(period)
            continue
        scan: list[int] = []
        done = 0
        while done < scan_bytes:
            (size,) = draw_sizes(rng, 1)
            scan.append(len(all_sizes))
            all_sizes.append(size)
            done += size
        during = round(scan_spread * len(period))
        scans.extend(interleave(rng, period[:during], scan))
        scans.extend(period[during:])
        bursts.extend(period)
        bursts.extend(scan)

    shifted = array("I")
    for start in range(0, requests, shift_every):
        ranking = list(range(objects))
        if start:
            rng.shuffle(ranking)  # a new set of popular objects, same sizes
        shifted.extend(ranking[obj] for obj in zipf[start : start + shift_every])
    return [
        Trace("zipf", seed, array("I", zipf), sizes, working_set),
        Trace(SCAN_TRACE, seed, scans, all_sizes, working_set),
        Trace("zipf+burst-scans", seed, bursts, all_sizes, working_set),
        Trace("zipf-shift", seed, shifted, sizes, working_set),
    ]


# ---------------------------------------------------------------------------- simulation


class TextbookLFUDA:
    """Reference only (not a cache policy): LFU-DA as published, priority = clock + hits."""

    name = TEXTBOOK

    def priority(self, *, hits: int, last_access: float, clock: float) -> float:
        return clock + hits

    def advance(self, clock: float, evicted_priority: float) -> float:
        return max(clock, evicted_priority)


def policy_named(name: str) -> EvictionPolicy:
    return TextbookLFUDA() if name == TEXTBOOK else make_policy(name)


def simulate_policy(
    policy: EvictionPolicy,
    requests: Sequence[int],
    sizes: Sequence[int],
    capacity: int,
    low_watermark: float = 0.90 / 0.95,
) -> tuple[int, int, int, int]:
    """Replay `requests` through a cache of `capacity` bytes that evicts as the index does.

    Returns (hits, requested bytes, hit bytes, evictions).
    """
    priority = policy.priority
    advance = policy.advance
    heappush, heappop = heapq.heappush, heapq.heappop
    low = low_watermark * capacity
    clock = 0.0
    used = 0
    hits = hit_bytes = requested = evictions = 0
    count: dict[int, int] = {}  # cached object -> access count while cached
    token: dict[int, int] = {}  # cached object -> request number of its live heap entry
    heap: list[tuple[float, int, int]] = []  # (priority, request number, object), lazy
    for now, obj in enumerate(requests):
        size = sizes[obj]
        requested += size
        accesses = count.get(obj)
        if accesses is not None:
            hits += 1
            hit_bytes += size
            accesses += 1
        elif size > capacity:
            continue  # it could never fit: served without being cached
        else:
            accesses = 1
            used += size
        count[obj] = accesses
        token[obj] = now
        heappush(heap, (priority(hits=accesses, last_access=now, clock=clock), now, obj))
        if used > capacity:
            while used > low:
                prio, when, victim = heappop(heap)
                if token.get(victim) != when:
                    continue  # stale entry: the object was accessed again since
                del token[victim]
                del count[victim]
                used -= sizes[victim]
                evictions += 1
                clock = advance(clock, prio)
            if len(heap) > 2 * len(token) + 4096:  # drop the stale entries now and then
                heap = [entry for entry in heap if token.get(entry[2]) == entry[1]]
                heapq.heapify(heap)
    return hits, requested, hit_bytes, evictions


def next_uses(requests: Sequence[int]) -> list[int]:
    """Per request, the position of the next request of the same object.

    An object never requested again gets `len(requests) + position`: beyond every real
    position, and distinct so that ties stay deterministic.
    """
    never = len(requests)
    following: dict[int, int] = {}
    out = [0] * len(requests)
    for i in range(len(requests) - 1, -1, -1):
        obj = requests[i]
        out[i] = following.get(obj, never + i)
        following[obj] = i
    return out


def simulate_belady(
    requests: Sequence[int], sizes: Sequence[int], capacity: int
) -> tuple[int, int, int, int]:
    """Offline: evict the cached object whose next use is farthest (the new one included)."""
    nxt = next_uses(requests)
    heappush, heappop = heapq.heappush, heapq.heappop
    used = 0
    hits = hit_bytes = requested = evictions = 0
    token: dict[int, int] = {}  # cached object -> its next use (that of its live heap entry)
    heap: list[tuple[int, int]] = []  # (-next use, object), lazy
    for now, obj in enumerate(requests):
        size = sizes[obj]
        requested += size
        if obj in token:
            hits += 1
            hit_bytes += size
        elif size > capacity:
            continue
        else:
            used += size
        following = nxt[now]
        token[obj] = following
        heappush(heap, (-following, obj))
        if used > capacity:
            while used > capacity:
                neg_next, victim = heappop(heap)
                if token.get(victim) != -neg_next:
                    continue
                del token[victim]
                used -= sizes[victim]
                if victim != obj:
                    evictions += 1  # (the new object leaving at once is a bypass)
            if len(heap) > 2 * len(token) + 4096:
                heap = [entry for entry in heap if token.get(entry[1]) == -entry[0]]
                heapq.heapify(heap)
    return hits, requested, hit_bytes, evictions


# ---------------------------------------------------------------------------- driver

_TRACES: dict[tuple[int, str], Trace] = {}  # filled before the worker processes fork


def run_one(seed: int, trace_name: str, fraction: float, policy: str, low: float) -> Result:
    trace = _TRACES[(seed, trace_name)]
    capacity = int(fraction * trace.working_set)
    if policy == BELADY:
        counts = simulate_belady(trace.requests, trace.sizes, capacity)
    else:
        counts = simulate_policy(policy_named(policy), trace.requests, trace.sizes, capacity, low)
    hits, requested, hit_bytes, evictions = counts
    return Result(
        trace=trace_name,
        seed=seed,
        cache_fraction=fraction,
        policy=policy,
        requests=len(trace.requests),
        hits=hits,
        requested_bytes=requested,
        hit_bytes=hit_bytes,
        evictions=evictions,
    )


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs (nproc), {cpu}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.system()} {platform.machine()}"
    )


def fractions_arg(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError("cache fractions must be in (0, 1]")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    choices = [*POLICIES, TEXTBOOK, BELADY]
    parser = argparse.ArgumentParser(
        description="Byte hit ratio of the cache eviction policies, and of Belady's offline "
        "optimum, on synthetic Zipf traces with and without one-off scans.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the first catalogue")
    parser.add_argument(
        "--seeds", type=int, default=5, help="catalogues (seeds SEED, SEED+1, ...) averaged"
    )
    parser.add_argument(
        "--requests", type=int, default=500_000, help="Zipf requests per trace (besides scans)"
    )
    parser.add_argument("--objects", type=int, default=10_000, help="objects in the catalogue")
    parser.add_argument("--alpha", type=float, default=0.9, help="Zipf exponent")
    parser.add_argument(
        "--cache-fraction",
        type=fractions_arg,
        default="0.05,0.10",
        help="cache sizes as fractions of the catalogue's bytes, comma-separated",
    )
    parser.add_argument(
        "--scan-every", type=int, default=10_000, help="Zipf requests per scan period"
    )
    parser.add_argument(
        "--scan-fraction",
        type=float,
        default=0.25,
        help="bytes of one scan, as a fraction of the catalogue's bytes",
    )
    parser.add_argument(
        "--scan-spread",
        type=float,
        default=0.5,
        help="part of its period over which a scan is interleaved with the other requests",
    )
    parser.add_argument(
        "--shift-every",
        type=int,
        default=100_000,
        help="requests between two reshufflings of the popularity (zipf-shift trace)",
    )
    parser.add_argument(
        "--low-watermark",
        type=float,
        default=round(0.90 / 0.95, 4),
        help="eviction stops under this fraction of the cache size, which is the high "
        "watermark (0.90/0.95 as in the index; 1: evict just enough)",
    )
    parser.add_argument(
        "--policies",
        default=",".join(choices),
        help=f"comma-separated, among {', '.join(choices)}",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="simulations run in parallel"
    )
    parser.add_argument(
        "--output-md",
        type=Path,
        metavar="PATH",
        help=f"write (or replace) the section {SECTION!r} of this markdown file",
    )
    args = parser.parse_args(argv)
    if min(args.seeds, args.requests, args.objects, args.scan_every, args.shift_every) < 1:
        parser.error("--seeds, --requests, --objects, --scan-every, --shift-every must be >= 1")
    if not 0 <= args.scan_spread <= 1 or args.scan_fraction < 0:
        parser.error("--scan-spread must be in [0, 1] and --scan-fraction >= 0")
    if not 0 < args.low_watermark <= 1:
        parser.error("--low-watermark must be in (0, 1]")
    names = [name.strip() for name in args.policies.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        parser.error(f"unknown policies {unknown}: choose among {', '.join(choices)}")
    args.policies = names
    return args


def points(values: Sequence[float]) -> str:
    """Mean and range over the catalogues, in points."""
    text = f"{100 * statistics.fmean(values):+.1f}"
    if len(values) > 1:
        text += f" ({100 * min(values):+.1f} to {100 * max(values):+.1f})"
    return text


def target_verdict(fraction: float, diffs: Sequence[float], seeds: Sequence[int]) -> str:
    mean = 100 * statistics.fmean(diffs)
    missed = [seed for seed, diff in zip(seeds, diffs, strict=True) if 100 * diff < TARGET_POINTS]
    text = f"cache {fraction:.0%}: {'met' if mean >= TARGET_POINTS else 'NOT met'} on average"
    text += f" ({mean:+.1f})"
    if missed:
        text += f", missed with the catalogue(s) of seed(s) {', '.join(map(str, missed))}"
    else:
        text += f", and with each of the {len(seeds)} catalogues"
    return text


def render(results: list[Result], args: argparse.Namespace, seconds: float) -> str:
    seeds = list(range(args.seed, args.seed + args.seeds))
    traces = list(dict.fromkeys(r.trace for r in results))
    by_key = {(r.seed, r.trace, r.cache_fraction, r.policy): r for r in results}

    def mean(trace: str, fraction: float, policy: str, what: str) -> float:
        return statistics.fmean(
            getattr(by_key[(seed, trace, fraction, policy)], what) for seed in seeds
        )

    out = [
        f"Mean over {len(seeds)} catalogues (seeds {seeds[0]}..{seeds[-1]}); cache size as a "
        "fraction of the catalogue's bytes.",
        "",
        "| trace | cache | policy | byte hit ratio | object hit ratio |",
        "|---|---|---|---:|---:|",
    ]
    for trace in traces:
        for fraction in args.cache_fraction:
            for policy in args.policies:
                byte = mean(trace, fraction, policy, "byte_hit_ratio")
                obj = mean(trace, fraction, policy, "object_hit_ratio")
                out.append(
                    f"| {trace} | {fraction:.0%} | {policy} | {100 * byte:.1f}% "
                    f"| {100 * obj:.1f}% |"
                )
    if "lru" in args.policies and LOCALITY in args.policies:
        out += [
            "",
            f"{LOCALITY} minus lru, in points: mean over the catalogues (lowest to highest).",
            "",
            "| trace | cache | byte hit ratio | object hit ratio |",
            "|---|---|---:|---:|",
        ]
        verdicts: list[str] = []
        for trace in traces:
            for fraction in args.cache_fraction:
                diffs = [
                    (
                        by_key[(seed, trace, fraction, LOCALITY)],
                        by_key[(seed, trace, fraction, "lru")],
                    )
                    for seed in seeds
                ]
                by_bytes = [a.byte_hit_ratio - b.byte_hit_ratio for a, b in diffs]
                by_objects = [a.object_hit_ratio - b.object_hit_ratio for a, b in diffs]
                name = f"**{trace}**" if trace == SCAN_TRACE else trace
                out.append(
                    f"| {name} | {fraction:.0%} | {points(by_bytes)} | {points(by_objects)} |"
                )
                if trace == SCAN_TRACE:
                    verdicts.append(target_verdict(fraction, by_bytes, seeds))
        out += [
            "",
            f"Target of the issue, {LOCALITY} >= lru + {TARGET_POINTS:g} points of "
            f"byte hit ratio on {SCAN_TRACE}: " + "; ".join(verdicts) + ".",
        ]
    sample = [r for r in results if r.seed == seeds[0] and r.policy == args.policies[0]]
    lengths = {r.trace: r.requests for r in sample}
    out += [
        "",
        "Traces: " + ", ".join(f"`{t}` {n:,} requests" for t, n in lengths.items()) + "; "
        f"Zipf(alpha {args.alpha}) over {args.objects:,} objects, log-normal sizes (median "
        "1 MiB, sigma 1.5, clipped to [64 KiB, 64 MiB]) independent of popularity; "
        f"`zipf+scans`: every {args.scan_every:,} requests a one-off scan of "
        f"{args.scan_fraction:.0%} of the catalogue's bytes, interleaved with the requests "
        f"of the first {args.scan_spread:.0%} of the period; `zipf+burst-scans`: the same "
        f"scans read back to back; `zipf-shift`: popularity reshuffled every "
        f"{args.shift_every:,} requests. Eviction as in the index: lowest priority first, "
        f"from the cache size (high watermark) down to {args.low_watermark:.1%} of it (the "
        "index's 0.90/0.95 by default), the clock advanced "
        "per eviction, access counts forgotten on eviction. `belady`: evict the farthest "
        "next use (offline, full cache size), the usual approximation of the byte-optimal "
        "offline policy, which is NP-hard for variable sizes; `lfuda-textbook`: clock + hits, "
        "for reference. Details in the docstring of "
        "`benchmarks/cache_eviction.py`.",
        "",
        f"Command: `{shlex.join(['.venv/bin/python', 'benchmarks/cache_eviction.py', *args.argv])}`"
        f" ({seconds:.0f} s)",
        "",
        f"Machine: {machine()}.",
    ]
    return "\n".join(out)


def update_markdown(path: Path, body: str) -> None:
    """Write `body` as the section SECTION of `path`, keeping the other sections."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cache_common import update_markdown as write_section

    write_section(path, SECTION, body)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    args.argv = arguments
    started = time.perf_counter()
    _TRACES.clear()
    for seed in range(args.seed, args.seed + args.seeds):
        for trace in make_traces(
            seed=seed,
            requests=args.requests,
            objects=args.objects,
            alpha=args.alpha,
            scan_every=args.scan_every,
            scan_fraction=args.scan_fraction,
            scan_spread=args.scan_spread,
            shift_every=args.shift_every,
        ):
            _TRACES[(seed, trace.name)] = trace
    jobs = [
        (seed, name, fraction, policy, args.low_watermark)
        for (seed, name) in _TRACES
        for fraction in args.cache_fraction
        for policy in args.policies
    ]
    if args.jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
        # forked workers inherit _TRACES instead of receiving it pickled
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            results = list(pool.map(run_one, *zip(*jobs, strict=True), chunksize=1))
    else:
        results = [run_one(*job) for job in jobs]
    body = render(results, args, time.perf_counter() - started)
    print(body)
    if args.output_md:
        update_markdown(args.output_md, body)
        print(f"\nwrote the section {SECTION!r} of {args.output_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
