"""Choosing caches for a request: client address -> site (CIDR site map), distance
between sites, health and load, then rendezvous hashing among equally good caches.

Site map (TOML):

    distance_step_km = 100          # distances are compared in steps of this size
    default_site = "CHTC"           # optional: site of clients no network matches

    [sites.CHTC]
    networks = ["128.104.0.0/16", "2607:f388::/32"]
    coordinates = [43.07, -89.40]   # latitude, longitude (degrees)

    [sites.UNL]
    networks = ["129.93.0.0/16"]
    coordinates = [40.82, -96.70]

    [distances.CHTC]                # optional, km; symmetric; wins over coordinates
    UNL = 750
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stashflow.cache.director.registry import Cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN = math.inf


class SiteMapError(ValueError):
    """The site map file is missing or malformed (one sentence, user-facing)."""


@dataclass
class Site:
    name: str
    networks: list[IPNetwork] = field(default_factory=list)
    coordinates: tuple[float, float] | None = None


@dataclass
class SiteMap:
    sites: dict[str, Site] = field(default_factory=dict)
    distances: dict[tuple[str, str], float] = field(default_factory=dict)
    distance_step_km: float = 100.0
    default_site: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> SiteMap:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise SiteMapError(f"site map {path} does not exist") from None
        except OSError as e:
            raise SiteMapError(f"site map {path} cannot be read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise SiteMapError(f"site map {path} is not valid TOML: {e}") from None
        return cls.from_dict(doc, str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "site map") -> SiteMap:
        out = cls()
        step = doc.get("distance_step_km", 100)
        if isinstance(step, bool) or not isinstance(step, int | float) or step <= 0:
            raise SiteMapError(f"{source}: distance_step_km must be a positive number")
        out.distance_step_km = float(step)
        sites = doc.get("sites", {})
        if not isinstance(sites, dict):
            raise SiteMapError(f"{source}: [sites] must be a table of sites")
        for name, spec in sites.items():
            if not isinstance(spec, dict):
                raise SiteMapError(f"{source}: [sites.{name}] must be a table")
            site = Site(name)
            nets = spec.get("networks", [])
            if not isinstance(nets, list):
                raise SiteMapError(f"{source}: sites.{name}.networks must be a list of CIDRs")
            for net in nets:
                try:
                    site.networks.append(ipaddress.ip_network(str(net), strict=False))
                except ValueError:
                    raise SiteMapError(
                        f"{source}: sites.{name}.networks has {net!r}, which is not a CIDR"
                    ) from None
            coords = spec.get("coordinates")
            if coords is not None:
                if (
                    not isinstance(coords, list)
                    or len(coords) != 2
                    or not all(isinstance(c, int | float) for c in coords)
                    or not -90 <= coords[0] <= 90
                    or not -180 <= coords[1] <= 180
                ):
                    raise SiteMapError(
                        f"{source}: sites.{name}.coordinates must be [latitude, longitude]"
                    )
                site.coordinates = (float(coords[0]), float(coords[1]))
            out.sites[name] = site
        table = doc.get("distances", {})
        if not isinstance(table, dict):
            raise SiteMapError(f"{source}: [distances] must be a table")
        for a, row in table.items():
            if not isinstance(row, dict):
                raise SiteMapError(f"{source}: [distances.{a}] must be a table of site = km")
            for b, km in row.items():
                if isinstance(km, bool) or not isinstance(km, int | float) or km < 0:
                    raise SiteMapError(f"{source}: distances.{a}.{b} must be a number >= 0")
                out.distances[(a, b)] = float(km)
                out.distances[(b, a)] = float(km)
        default = doc.get("default_site")
        if default is not None:
            if default not in out.sites:
                raise SiteMapError(f"{source}: default_site {default!r} is not a site")
            out.default_site = default
        return out

    def site_of(self, addr: IPAddress | None) -> str | None:
        """The site whose most specific network contains `addr`."""
        best: tuple[int, str] | None = None
        if addr is not None:
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            for site in self.sites.values():
                for net in site.networks:
                    if net.version == addr.version and addr in net:
                        if best is None or net.prefixlen > best[0]:
                            best = (net.prefixlen, site.name)
        return best[1] if best else self.default_site

    def distance(self, a: str | None, b: str | None) -> float:
        """km between two sites; 0 for the same site; UNKNOWN when it cannot be told."""
        if a is None or b is None:
            return UNKNOWN
        if a == b:
            return 0.0
        if (a, b) in self.distances:
            return self.distances[(a, b)]
        sa, sb = self.sites.get(a), self.sites.get(b)
        if sa and sb and sa.coordinates and sb.coordinates:
            return haversine_km(sa.coordinates, sb.coordinates)
        return UNKNOWN


def haversine_km(p: tuple[float, float], q: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*p, *q))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(h)))


def parse_networks(values: Iterable[str], what: str) -> list[IPNetwork]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise SiteMapError(f"{what} {v!r} is not an address or CIDR network") from None
    return out


def parse_address(text: str | None) -> IPAddress | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> IPAddress | None:
    """The client's address: the TCP peer, or, when the peer is a trusted proxy, the
    right-most address of X-Forwarded-For that is not itself a trusted proxy."""
    addr = parse_address(peer)
    if addr is None or not forwarded_for or not _trusted(addr, trusted):
        return addr
    for hop in reversed([h for h in forwarded_for.split(",") if h.strip()]):
        hop_addr = parse_address(hop)
        if hop_addr is None:
            break  # garbage in the chain: trust nothing further left
        addr = hop_addr
        if not _trusted(hop_addr, trusted):
            break
    return addr


def _trusted(addr: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(net.version == addr.version and addr in net for net in trusted)


def rendezvous_weight(cache_key: str, path: str) -> int:
    """Highest-random-weight score of a cache for an object: stable across processes
    and restarts (a keyed hash, not Python's randomised hash())."""
    data = cache_key.encode() + b"\0" + path.encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class Ranked:
    cache: Cache
    state: str
    distance: float
    tier: tuple[int, float]


def rank(
    candidates: Iterable[tuple[Cache, str]],
    path: str,
    client_site: str | None,
    site_map: SiteMap,
) -> list[Ranked]:
    """Order caches for one object, best first.

    1. health/load: caches that are `up` before those reporting a load at or above the
       limit (`full`);
    2. distance from the client's site: the same site first, then in steps of
       `distance_step_km`; caches whose distance cannot be told come last (when the
       client's site is unknown, all distances are equal);
    3. among caches equal on both, rendezvous hashing on the object path, so each object
       has one preferred cache and removing a cache moves only the objects it held.
    """
    out = []
    for cache, state in candidates:
        if client_site is None:
            dist, step = 0.0, 0.0
        else:
            dist = site_map.distance(client_site, cache.site)
            if dist == 0.0 and cache.site == client_site:
                step = 0.0
            elif dist == UNKNOWN:
                step = UNKNOWN
            else:
                step = 1.0 + math.floor(dist / site_map.distance_step_km)
        tier = (0 if state == "up" else 1, step)
        out.append(Ranked(cache, state, dist, tier))
    out.sort(key=lambda r: (r.tier, -rendezvous_weight(r.cache.url, path), r.cache.url))
    return out
