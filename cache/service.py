"""The cache's domain logic, apart from HTTP: finding objects, revalidating them against
their origin, verifying cached blocks, computing checksums, keeping within the size
and inode limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from stashflow.cache import metrics
from stashflow.cache.admission import Admission
from stashflow.cache.config import CacheConfig
from stashflow.cache.eviction import make_policy
from stashflow.cache.fetch import Fetcher
from stashflow.cache.index import Index, Record
from stashflow.cache.membership import Membership, NamespaceInfo
from stashflow.cache.namespace import Namespace, NamespaceMap
from stashflow.integration.checksums import Hasher, block_crc
from stashflow.integration.storage import NotFound, ObjectInfo, StorageError, Unavailable
from stashflow.integration.tokens import (
    Issuer,
    MissingToken,
    TokenVerifier,
    WrongIssuer,
    bearer_token,
    key_source,
)

log = logging.getLogger("stashflow.cache")
# file timestamps have a granularity (a kernel tick; a second on some filesystems)
RACY_NS = 1_000_000_000


class OriginTimeout(Exception):
    def __init__(self, origin: str, seconds: float) -> None:
        super().__init__(f"origin {origin} did not answer within {seconds:.0f}s")
        self.origin = origin


@dataclass
class _Verified:
    """Blocks of one data-file version whose checksum this worker has checked."""

    mtime_ns: int
    blocks: set[int] = field(default_factory=set)


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError as e:
        raise ValueError(f"cannot read the origin token file {path}: {e.strerror}") from None


class CacheService:
    def __init__(self, cfg: CacheConfig) -> None:
        self.cfg = cfg
        self.namespaces = NamespaceMap(
            cfg.origins, set(cfg.protected), _read_token(cfg.origin_token_file)
        )
        self.verifier: TokenVerifier | None = None
        for issuer, jwks in cfg.issuers.items():
            self.trust(issuer, jwks or None, cfg.issuer_base_paths.get(issuer, "/"))
        self.membership: Membership | None = None
        self.index = Index(cfg.directory, size=cfg.size, policy=make_policy(cfg.policy))
        self.admission = Admission(
            cfg.total_concurrency, cfg.origin_concurrency, cfg.queue_limit, cfg.origin_timeout
        )
        self.fetcher = Fetcher(self.index, cfg, self.admission)
        self._negative: dict[str, float] = {}
        self._lookups: dict[str, asyncio.Future[Record]] = {}
        self._checksums: dict[tuple[bytes, int, str], asyncio.Task[Any]] = {}
        self._origin_checksums: dict[tuple[bytes, int, str], asyncio.Task[Any]] = {}
        self._base_paths: dict[str, str] = {}  # namespace -> token base path (director)
        self._accesses: dict[bytes, tuple[int, float]] = {}
        # touch() runs on the event loop, flush_accesses() in worker threads: the batch
        # must not change hands between a read and a write of the loop's
        self._accesses_lock = threading.Lock()
        self._verified: dict[tuple[bytes, int], _Verified] = {}
        self._background: list[asyncio.Task[None]] = []
        self.disk_state = "ok"
        self._wake: asyncio.Event | None = None  # set to run housekeeping at once

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self.fetcher.on_full = self._wake.set
        self._background.append(asyncio.create_task(self._housekeeping()))
        if self.cfg.director:
            self.membership = Membership(self.cfg, self._member_status, self._learn)
            await self.membership.start()

    async def close(self) -> None:
        if self.membership is not None:
            await self.membership.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.verifier is not None:
            await self.verifier.close()
        await self.fetcher.close()
        await asyncio.to_thread(self.flush_accesses)
        await asyncio.to_thread(self.index.release_marks)
        await self.namespaces.close()
        self.index.sync()
        self.index.close()

    # -- federation and tokens ----------------------------------------------------------

    def trust(self, issuer: str, jwks: str | None, base_path: str = "/") -> None:
        """Accept tokens of `issuer` (keys from a JWKS file or URL, or discovered from
        the issuer's openid-configuration when None), their scope paths relative to
        `base_path`."""
        if self.verifier is None:
            self.verifier = TokenVerifier(
                {}, audiences=[self.cfg.advertised_url, *self.cfg.audiences]
            )
        if issuer not in self.verifier.issuers:
            self.verifier.issuers[issuer] = Issuer(
                issuer, key_source(jwks, issuer=issuer), base_path
            )

    def _member_status(self) -> dict[str, Any]:
        active = sum(self.admission.active().values())
        return {
            "load": min(1.0, active / max(1, self.cfg.total_concurrency)),
            "free_bytes": max(0, self.cfg.size - self.index.usage()),
        }

    def _learn(self, learned: NamespaceInfo) -> None:
        for prefix, (_url, require_token, issuer, base_path) in learned.items():
            if require_token and issuer:
                self.trust(issuer, None)
                # per namespace: one issuer may serve several, each with its own base
                self._base_paths[prefix] = base_path
        retired = self.namespaces.update(
            {prefix: (info[0], info[1]) for prefix, info in learned.items()}
        )
        for storage in retired:
            task = asyncio.ensure_future(storage.close())
            self._background.append(task)

    async def authorize(self, ns: Namespace, key: str, authorization: str | None,
                        authz: str | None) -> None:
        """Reads of a protected namespace need a valid token whose storage.read scope
        covers the object. Raises a TokenError carrying the HTTP status."""
        if not ns.protected:
            return
        raw = bearer_token(authorization)
        if raw is None and authz:
            # XRootD and Pelican clients may pass the token as ?authz=Bearer%20<jwt>
            raw = bearer_token(authz) or authz.strip() or None
        if raw is None:
            raise MissingToken(f"{key} is in a protected namespace: send a bearer token")
        if self.verifier is None:
            raise WrongIssuer("this cache trusts no token issuer for protected namespaces")
        token = await self.verifier.verify(raw, base_path=self._base_paths.get(ns.prefix))
        token.require("read", key)

    # -- finding objects --------------------------------------------------------------

    async def lookup(self, ns: Namespace, key: str) -> Record:
        """The record of `key`, revalidated against the origin if its TTL has passed.
        Raises NotFound, Unavailable or OriginTimeout."""
        now = time.time()
        neg = self._negative.get(key)
        if neg is not None:
            if neg > now:
                raise NotFound(ns.storage.url_of(ns.relative(key)), "not found at the origin")
            del self._negative[key]
        rec = self.index.get(key)
        if rec is not None and now - rec.validated < self.cfg.revalidate_ttl:
            return rec
        pending = self._lookups.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._lookups[key] = fut
        try:
            info = await self._stat(ns, key)
            rec = await asyncio.to_thread(
                self.index.upsert,
                key,
                size=info.size,
                mtime=info.mtime,
                etag=info.etag,
                checksums=info.checksums,
                block_size=self.cfg.block_size,
                inline_max=self.cfg.inline_max,
                now=now,
            )
            fut.set_result(rec)
            return rec
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            del self._lookups[key]

    async def _stat(self, ns: Namespace, key: str) -> ObjectInfo:
        rel = ns.relative(key)
        try:
            async with asyncio.timeout(self.cfg.origin_timeout):
                info = await ns.storage.stat(rel)
        except TimeoutError:
            metrics.ORIGIN_ERRORS.labels(ns.prefix, "timeout").inc()
            raise OriginTimeout(ns.origin_url, self.cfg.origin_timeout) from None
        except NotFound:
            self._negative[key] = time.time() + self.cfg.negative_ttl
            raise
        except StorageError as e:
            metrics.ORIGIN_ERRORS.labels(ns.prefix, type(e).__name__).inc()
            raise
        except OSError as e:
            metrics.ORIGIN_ERRORS.labels(ns.prefix, "unavailable").inc()
            raise Unavailable(ns.storage.url_of(rel), str(e)) from e
        if info.is_dir:
            raise NotFound(ns.storage.url_of(rel), "is a directory, not an object")
        return info

    def touch(self, rec: Record) -> None:
        with self._accesses_lock:
            hits, _ = self._accesses.get(rec.objid, (0, 0.0))
            self._accesses[rec.objid] = (hits + 1, time.time())

    def flush_accesses(self) -> None:
        """Write this worker's batched access counts to the index (blocking)."""
        with self._accesses_lock:
            batch, self._accesses = self._accesses, {}
        if batch:
            self.index.record_accesses(batch)

    # -- integrity --------------------------------------------------------------------

    def all_verified(self, fd: int, rec: Record, crcs: dict[int, int]) -> bool:
        """Whether every block of `crcs` was verified in this version of the data file
        (a cheap check that spares a trip to a thread for verify_blocks)."""
        if self.cfg.verify == "always":
            return False
        mtime_ns = os.fstat(fd).st_mtime_ns
        seen = self._seen(rec, mtime_ns)
        if all(idx in seen.blocks for idx in crcs):
            return True
        # another worker, or an earlier run, may have checked them
        seen.blocks |= self.index.verified(rec, mtime_ns, crcs)
        return all(idx in seen.blocks for idx in crcs)

    def _seen(self, rec: Record, mtime_ns: int) -> _Verified:
        key = (rec.objid, rec.gen)
        seen = self._verified.get(key)
        if seen is None or seen.mtime_ns != mtime_ns:
            seen = self._verified[key] = _Verified(mtime_ns)
            if len(self._verified) > 100_000:
                self._verified.clear()
                self._verified[key] = seen
        return seen

    def verify_blocks(self, fd: int, rec: Record, crcs: dict[int, int]) -> list[int]:
        """Check the blocks `crcs` against the data file; return the corrupted ones.

        With verify='on-change' a block is checked once per version of the data file
        (its mtime): any write to the file, including one that corrupts it, changes
        the mtime and makes every block of it checked again. As in git's "racy clean"
        rule, a check is remembered only when the mtime is older than the timestamp
        granularity: a write in the same tick as the last one would not change it."""
        mtime_ns = os.fstat(fd).st_mtime_ns
        remember = time.time_ns() - mtime_ns > RACY_NS
        always = self.cfg.verify == "always"
        seen = _Verified(mtime_ns) if always else self._seen(rec, mtime_ns)
        bad: list[int] = []
        good: list[int] = []
        for idx, crc in crcs.items():
            if idx in seen.blocks:
                continue
            length = rec.block_len(idx)
            data = os.pread(fd, length, idx * rec.block_size)
            if len(data) == length and block_crc(data) == crc:
                good.append(idx)
            else:
                bad.append(idx)
        if remember and good and not always:
            seen.blocks.update(good)
            self.index.note_verified(rec, mtime_ns, good)
        return bad

    def corrupted(self, rec: Record, blocks: list[int]) -> None:
        metrics.CORRUPT_BLOCKS.inc(len(blocks))
        log.error("corrupted cached block(s) %s of %s: dropped, will be refetched", blocks, rec.key)
        for idx in blocks:
            self.index.drop_block(rec, idx)

    async def inline_bytes(
        self, ns: Namespace, rec: Record, stored: tuple[int, bytes] | None = None
    ) -> bytes:
        """The content of a small object, fetched if absent or corrupted. `stored` is
        what the caller already read from the index, if it did."""
        for attempt in range(3):
            if attempt or stored is None:
                stored = self.index.inline_data(rec)
            if stored is not None:
                crc, data = stored
                if block_crc(data) == crc:
                    return data
                metrics.CORRUPT_BLOCKS.inc()
                log.error("corrupted inline object %s: dropped, will be refetched", rec.key)
                self.index.drop_inline(rec)
            fill = self.fetcher.ensure(ns, rec, 0, 0, 0)
            for fut in fill.futures.values():
                parts = await fut
                if parts is not None:  # fetched by this worker: the origin's bytes
                    return b"".join(parts)
        raise Unavailable(rec.key, "could not obtain a verified copy of the object")

    # -- checksums --------------------------------------------------------------------

    async def checksum(
        self, ns: Namespace, rec: Record, algorithm: str, *, wait: bool = True,
        compute: bool = True,
    ) -> str | None:
        """The object's checksum: known, from the origin's server-side checksum, or
        computed once from the cached data (fetching what is missing). Without `wait`,
        only the origin is asked (within `origin_timeout`); a computation that is still
        needed then runs in the background if `compute`, and None is returned."""
        known = rec.checksums.get(algorithm)
        if known:
            return known
        key = (rec.objid, rec.gen, algorithm)
        if not wait:
            value = await asyncio.shield(self._shared(self._origin_checksums, key,
                                                      self._origin_checksum(ns, rec, algorithm)))
            if value is not None or not compute:
                return value
        task = self._shared(self._checksums, key,
                            self._checksum(ns, rec, algorithm, ask_origin=wait))
        if wait:
            return await asyncio.shield(task)
        return None

    @staticmethod
    def _shared(tasks: dict[Any, asyncio.Task[Any]], key: Any,
                work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """One task per key for concurrent requests; forgotten once done."""
        task = tasks.get(key)
        if task is not None:
            work.close()
            return task
        task = tasks[key] = asyncio.ensure_future(work)
        task.add_done_callback(lambda t: tasks.pop(key, None))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _origin_checksum(self, ns: Namespace, rec: Record, algorithm: str) -> str | None:
        rel = ns.relative(rec.key)
        try:
            async with asyncio.timeout(self.cfg.origin_timeout):
                value = await ns.storage.server_checksum(rel, algorithm)
        except (StorageError, TimeoutError) as e:
            log.info("origin checksum of %s unavailable (%s)", rec.key, e)
            return None
        if value is not None:
            await asyncio.to_thread(self.index.set_checksum, rec, algorithm, value)
        return value

    async def _checksum(self, ns: Namespace, rec: Record, algorithm: str,
                        ask_origin: bool = True) -> str:
        value = None
        if ask_origin:
            key = (rec.objid, rec.gen, algorithm)
            value = await asyncio.shield(self._shared(self._origin_checksums, key,
                                                      self._origin_checksum(ns, rec, algorithm)))
        if value is None:
            value = await self._compute_checksum(ns, rec, algorithm)
            await asyncio.to_thread(self.index.set_checksum, rec, algorithm, value)
        return value

    async def _compute_checksum(self, ns: Namespace, rec: Record, algorithm: str) -> str:
        if rec.inline:
            data = await self.inline_bytes(ns, rec)
            hasher = Hasher(algorithm)
            hasher.update(data)
            return hasher.hexdigest()
        last = rec.nblocks - 1
        window = max(1, self.cfg.window)
        hasher = Hasher(algorithm)
        path = self.index.data_path(rec)
        for start in range(0, last + 1, window):
            end = min(last, start + window - 1)
            fill = self.fetcher.ensure(ns, rec, start, end, last)
            # blocks this worker just fetched are hashed from memory, the others from disk
            in_memory = {idx: await fut for idx, fut in fill.futures.items()}
            on_disk = [i for i in range(start, end + 1) if in_memory.get(i) is None]
            crcs = self.index.present_blocks(rec, start, end) if on_disk else {}
            if any(i not in crcs for i in on_disk):
                raise Unavailable(rec.key, "cached data was evicted while computing its checksum")

            def _hash_range(
                start: int = start,
                end: int = end,
                in_memory: dict[int, Any] = in_memory,
                crcs: dict[int, int] = crcs,
            ) -> list[int]:
                fd = os.open(path, os.O_RDONLY) if crcs else -1
                try:
                    bad = self.verify_blocks(fd, rec, crcs) if crcs else []
                    if bad:
                        return bad
                    for idx in range(start, end + 1):
                        parts = in_memory.get(idx)
                        if parts is None:
                            parts = [os.pread(fd, rec.block_len(idx), idx * rec.block_size)]
                        for part in parts:
                            hasher.update(part)
                    return []
                finally:
                    if fd >= 0:
                        os.close(fd)

            bad = await asyncio.to_thread(_hash_range)
            if bad:
                self.corrupted(rec, bad)
                raise Unavailable(rec.key, "cached data was corrupted while computing its checksum")
        return hasher.hexdigest()

    # -- space ------------------------------------------------------------------------

    def filesystem(self) -> dict[str, float]:
        st = os.statvfs(self.cfg.directory)
        total_inodes = st.f_files or 1
        return {
            "fs_free_bytes": st.f_bavail * st.f_frsize,
            "fs_total_bytes": st.f_blocks * st.f_frsize,
            "inodes_total": st.f_files,
            "inodes_free": st.f_favail,
            "inode_use_ratio": (st.f_files - st.f_favail) / total_inodes if st.f_files else 0.0,
        }

    def enforce_limits(self) -> None:
        """Evict down to the low watermark when over the high one, in bytes of the
        quota and in inodes of the cache filesystem."""
        usage = self.index.usage()
        state = "ok"
        if usage > self.cfg.high_watermark * self.cfg.size:
            # this worker's recent reads count in the order before anything is chosen
            self.flush_accesses()
            need = int(usage - self.cfg.low_watermark * self.cfg.size)
            result = self.index.evict(need)
            metrics.EVICTIONS.inc(result.objects)
            metrics.EVICTED_BYTES.inc(result.bytes)
            if result.bytes < need:
                state = "full: the rest of the cache is pinned or in use"
        fs = self.filesystem()
        if fs["inodes_total"] and fs["inode_use_ratio"] > self.cfg.inode_high_watermark:
            excess = fs["inode_use_ratio"] - self.cfg.inode_low_watermark
            result = self.index.evict_objects(max(1, int(excess * fs["inodes_total"])))
            metrics.EVICTIONS.inc(result.objects)
            metrics.EVICTED_BYTES.inc(result.bytes)
            fs = self.filesystem()
            if fs["inode_use_ratio"] > self.cfg.inode_high_watermark:
                state = (
                    f"inodes exhausted on the cache filesystem ({fs['inode_use_ratio']:.0%} used)"
                )
        # the filesystem can fill before the quota does (a quota larger than the disk,
        # or other users of it): keep room for a few fetch windows by evicting
        reserve = min(
            4 * self.cfg.block_size * self.cfg.window,
            fs["fs_total_bytes"] * (1 - self.cfg.high_watermark),
        )
        if fs["fs_free_bytes"] < reserve:
            result = self.index.evict(int(reserve - fs["fs_free_bytes"]))
            metrics.EVICTIONS.inc(result.objects)
            metrics.EVICTED_BYTES.inc(result.bytes)
            if self.filesystem()["fs_free_bytes"] < min(reserve, self.cfg.block_size):
                state = "cache filesystem full"
        if state != self.disk_state:
            (log.info if state == "ok" else log.error)("cache disk state: %s", state)
        self.disk_state = state

    async def _housekeeping(self) -> None:
        last_sync = last_flush = time.monotonic()
        assert self._wake is not None
        while True:
            # every second, and at once when a write found the cache disk full
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            full = self._wake.is_set()
            self._wake.clear()
            try:
                if full or time.monotonic() - last_flush >= self.cfg.access_flush:
                    # before evicting, so that recent reads count in the order
                    await asyncio.to_thread(self.flush_accesses)
                    last_flush = time.monotonic()
                # marks of reads that ended over a second ago: eviction may take those
                await asyncio.to_thread(self.index.release_marks, 1.0)
                await asyncio.to_thread(self.enforce_limits)
                if time.monotonic() - last_sync > 5:
                    await asyncio.to_thread(self.index.sync)
                    last_sync = time.monotonic()
                now = time.time()
                for key in [k for k, t in self._negative.items() if t <= now]:
                    del self._negative[key]
            except Exception:  # keep housekeeping alive whatever one round hit
                log.exception("cache housekeeping failed")

    def stats(self) -> dict[str, Any]:
        info = self.index.info()
        return {
            **info,
            "size_bytes": self.cfg.size,
            "usage_ratio": info["usage_bytes"] / self.cfg.size,
            "high_watermark": self.cfg.high_watermark,
            "low_watermark": self.cfg.low_watermark,
            "policy": self.cfg.policy,
            "block_size": self.cfg.block_size,
            "disk_state": self.disk_state,
            "origins": {ns.prefix: ns.origin_url for ns in self.namespaces},
            "active_fetches": self.admission.active(),
            **self.filesystem(),
        }
