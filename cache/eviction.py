"""Eviction policies, expressed as a priority per object.

The index keeps every evictable object in an LMDB table sorted by priority; eviction
pops the lowest priorities until disk use is under the low watermark. A policy only
decides what priority an object gets when it is accessed, and how its clock moves when
an object is evicted. Keeping policies this small means the offline simulator in
benchmarks/ runs the very same code as the cache.

- `lru`: priority = time of last access.
- `lfuda`: the locality-aware policy: LFU with dynamic ageing (Arlitt et al., "Evaluating
  content management techniques for Web proxy caches", 2000) with a logarithmic frequency
  weight: priority = clock + 1 + 20 * log2(access count), and the clock advances to the
  priority of each evicted object. Objects read once (scans) leave first, the re-read
  working set stays, a formerly hot object ages out. See `LFUDA` for why it is not the
  textbook clock + count.
"""

from __future__ import annotations

import math
from typing import Protocol


class EvictionPolicy(Protocol):
    name: str

    def priority(self, *, hits: int, last_access: float, clock: float) -> float:
        """Priority of an object just accessed (`hits` counts this access)."""
        ...

    def advance(self, clock: float, evicted_priority: float) -> float:
        """The policy clock after evicting an object of `evicted_priority`."""
        ...


class LRU:
    name = "lru"

    def priority(self, *, hits: int, last_access: float, clock: float) -> float:
        return last_access

    def advance(self, clock: float, evicted_priority: float) -> float:
        return clock


class LFUDA:
    """LFU with dynamic ageing and a logarithmic frequency weight.

    priority = clock + 1 + weight * log2(hits), weight 20 by default; the clock moves up to
    the priority of each evicted object, so it never goes down.

    An object read once (by a scan, a one-off download) gets clock + 1 and is among the
    first out; evicting it lifts the clock to that clock + 1 at most, so one-off traffic
    ages the cache by about one unit each time the one-off objects in it have turned over,
    not by one per object. An object re-read while cached rises `weight` units above the
    newcomers per doubling of its reads, and leaves once the clock has caught up with it,
    that is once it has not been read for long enough. The index forgets an evicted object
    (its count with it) and ranks a record just created with hits=0, counted as 1 here.

    Why not the textbook LFU-DA, clock + hits (weight 1, linear):

    - There an object read twice is one unit above the newcomers, and the clock gains a
      unit every turnover of the newcomers (in a full cache, about every eviction pass):
      an object re-read less often than every couple of passes is gone before its next
      read, its count lost, so the moderately popular objects never build up counts and
      the cache holds little more than the very hot ones. The strongest signal is whether
      an object is read again at all (as in 2Q, ARC or S3-FIFO); a weight of 20 makes that
      first re-read worth about twenty turnovers of one-off objects, which also keeps the
      re-read working set through a scan of a few cache sizes.
    - Linear counts keep an object read thousands of times for thousands of units after it
      goes cold; with log2 it lasts a few dozen, so the cache follows a change of the
      popular data (a larger linear weight would make that worse).
    - Size is left out of the priority on purpose (unlike GDSF, which divides by it): for
      the byte hit ratio, which is the origin traffic saved, an object's value per cached
      byte is its request rate, whatever its size; dividing by the size would trade bytes
      for object hits.

    benchmarks/cache_eviction.py (docs/benchmarks.md; Zipf 0.9 over 10k objects of
    64 KiB-64 MiB, caches of 5% and 10% of its bytes, mean of 5 catalogues) gives, in byte
    hit ratio, LRU / textbook LFU-DA / this: 47.2 / 54.3 / 58.2% and 57.1 / 63.4 / 66.4%
    without scans; 35.5 / 41.9 / 46.6% and 42.8 / 49.0 / 53.0% with one-off scans
    interleaved; 46.2 / 48.3 / 53.9% and 56.1 / 57.1 / 60.6% when the popular set is
    reshuffled every 100k requests. Weights 10 to 30 land within about a point of each
    other there (larger: a little more scan resistance, slower ageing); 20 is in the
    middle, not a fit to one figure.
    """

    name = "lfuda"

    def __init__(self, weight: float = 20.0) -> None:
        if not weight > 0:
            raise ValueError(f"lfuda weight must be positive, got {weight!r}")
        self.weight = weight

    def priority(self, *, hits: int, last_access: float, clock: float) -> float:
        return clock + 1.0 + self.weight * math.log2(max(hits, 1))

    def advance(self, clock: float, evicted_priority: float) -> float:
        return max(clock, evicted_priority)


POLICIES: dict[str, type[LRU] | type[LFUDA]] = {"lru": LRU, "lfuda": LFUDA}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}: choose one of {', '.join(POLICIES)}"
        ) from None
