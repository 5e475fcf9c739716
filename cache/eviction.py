"""Eviction policies, expressed as a priority per object.

The index keeps every evictable object in an LMDB table sorted by priority; eviction
pops the lowest priorities until disk use is under the low watermark. A policy only
decides what priority an object gets when it is accessed, and how its clock moves when
an object is evicted. Keeping policies this small means the offline simulator in
benchmarks/ runs the very same code as the cache.

- `lru`: priority = time of last access.
- `lfuda`: LFU with dynamic ageing (Arlitt et al., "Evaluating content management
  techniques for Web proxy caches", 2000): priority = clock + access count, and the
  clock advances to the priority of each evicted object. Objects read once by a scan
  sit just above the clock and leave first; the re-read working set accumulates
  counts and stays, yet a formerly hot object ages out as the clock passes it.
"""

from __future__ import annotations

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
    name = "lfuda"

    def priority(self, *, hits: int, last_access: float, clock: float) -> float:
        return clock + hits

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
