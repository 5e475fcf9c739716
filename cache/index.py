"""The cache index: one LMDB environment, the single source of truth of what is cached.

Format (all integers big-endian so that LMDB's byte order sorts them numerically):

    obj    objid(16)                      -> record (JSON, see `Record`)
    blk    objid(16) gen(4) block(4)      -> crc32c of the block (4 bytes)
    inl    objid(16)                      -> crc32c(4) + the whole object (small objects)
    claim  objid(16) gen(4) block(4)      -> owner: pid(4) start(8) since(8, float)
    open   objid(16) pid(4)               -> b"" (the process is reading the object)
    ord    priority(8, sortable) objid(16)-> b"" (evictable objects, lowest evicted first)
    meta   b"usage" -> bytes(8); b"clock" -> float(8)

objid is the first 16 bytes of sha256(object key), the key being "/ns/path". `gen`
changes whenever the object changes at the origin, so blocks of an old version can never
be mistaken for the new one. A block is present iff its `blk` row exists: data is
written to the data file first and the row committed after, so a crash between the two
leaves a block that is simply missing.

`usage` counts the bytes of present blocks, of inline objects and of claimed (being
fetched) blocks. Claims are made in the same write transaction that checks the size
limit, so the cache never holds or reserves more than `size` bytes, however many
workers are filling it. Claims name their process (pid and start time): a claim whose
process is gone is void and anyone may take it over.

Write transactions are serialized by LMDB across processes; the environment is opened
without fsync (`sync=False`), which survives `kill -9` of any process (LMDB's writes sit
in the page cache) but not a power cut, where the page of an unsynced commit may be
lost; `sync()` is called periodically to bound that window. Block checksums catch any
block whose data did not survive.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lmdb

from stashflow.cache.eviction import EvictionPolicy

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# blocks per row of the `ver` table: a row's bitmap stays small (512 bytes) however
# large the object
_VER_GROUP = 4096
_F64 = struct.Struct(">d")
_OWNER = struct.Struct(">IQd")
_CRC = struct.Struct("<I")


def _items(cursor: Any) -> Iterator[tuple[bytes, bytes]]:
    for k, v in cursor:
        yield bytes(k), bytes(v)


def object_id(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()[:16]


def _sortable(priority: float) -> bytes:
    """Encode a float so that byte order equals numeric order."""
    (bits,) = _U64.unpack(_F64.pack(priority))
    bits = bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)
    return _U64.pack(bits)


def _process_start(pid: int) -> int:
    """Start time of a process in clock ticks, or 0 if it does not exist. Together with
    the pid it names a process uniquely (pids are reused, start times are not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # the command name may contain spaces or parentheses: fields follow the last ')'
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


@dataclass
class Record:
    """What the cache knows about one object."""

    key: str
    size: int
    mtime: float | None
    etag: str | None
    block_size: int
    gen: int
    inline: bool
    checksums: dict[str, str] = field(default_factory=dict)
    present: int = 0  # bytes present (blocks or inline data)
    complete: bool = False
    pinned: bool = False
    validated: float = 0.0
    created: float = 0.0
    # access statistics last: they change every few seconds for a busy object, and readers
    # that only need the object's identity compare the bytes before them (fastpath.py)
    hits: int = 0
    atime: float = 0.0
    priority: float = 0.0

    @functools.cached_property
    def objid(self) -> bytes:
        return object_id(self.key)

    @property
    def nblocks(self) -> int:
        return max(1, -(-self.size // self.block_size))

    def block_len(self, idx: int) -> int:
        return max(0, min(self.block_size, self.size - idx * self.block_size))

    def same_version(self, size: int, mtime: float | None, etag: str | None) -> bool:
        if size != self.size:
            return False
        if etag and self.etag:
            return etag == self.etag
        return mtime == self.mtime

    def dumps(self) -> bytes:
        # the fields by hand: dataclasses.asdict deep-copies and costs ~6x more
        return _ENCODE({name: getattr(self, name) for name in _RECORD_FIELDS}).encode()

    @classmethod
    def loads(cls, raw: bytes | memoryview) -> Record:
        return cls(**json.loads(bytes(raw)))


_RECORD_FIELDS = tuple(f.name for f in fields(Record))
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


class NoSpace(Exception):
    """The cache cannot make room: everything left is pinned or in use."""


@dataclass
class Claim:
    """Blocks this process has promised to fetch."""

    objid: bytes
    gen: int
    blocks: list[int]
    nbytes: int


@dataclass
class EvictionResult:
    objects: int = 0
    bytes: int = 0
    files: list[Path] = field(default_factory=list)


def _ver_key(rec: Record, group: int) -> bytes:
    """Key of a `ver` row: object id, generation, group of _VER_GROUP blocks."""
    return rec.objid + _U32.pack(rec.gen) + _U32.pack(group)


def _ver_bitmap(raw: bytes | None, mtime_ns: int) -> bytes:
    """The verified-blocks bitmap of a `ver` row, empty unless the row was written for
    the data file's current version (modification time `mtime_ns`)."""
    if raw is None or _U64.unpack_from(raw)[0] != mtime_ns:
        return b""
    return bytes(raw[8:])


class Index:
    def __init__(
        self,
        directory: Path,
        *,
        size: int,
        policy: EvictionPolicy,
        map_size: int = 1 << 36,
    ) -> None:
        self.directory = directory
        self.size = size
        self.policy = policy
        directory.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(directory / "index"),
            map_size=map_size,
            max_dbs=8,
            max_readers=1024,
            sync=False,
            metasync=False,
            readahead=False,
            subdir=True,
        )
        self._obj = self.env.open_db(b"obj")
        self._blk = self.env.open_db(b"blk")
        self._inl = self.env.open_db(b"inl")
        self._claim = self.env.open_db(b"claim")
        self._open = self.env.open_db(b"open")
        self._ord = self.env.open_db(b"ord")
        self._meta = self.env.open_db(b"meta")
        self._ver = self.env.open_db(b"ver")
        self.pid = os.getpid()
        self._owner = _OWNER.pack(self.pid, _process_start(self.pid), 0.0)[:12]
        self._liveness: dict[tuple[int, int], tuple[bool, float]] = {}
        # Reads in progress in this process, and the `open` marks of finished reads that
        # are still in the index: a write transaction for every read that starts and
        # ends cost about a fifth of a worker serving 100 KiB hits, so a mark stays
        # while its object is read again and is removed by `release_marks` in batches.
        self._reading: dict[bytes, int] = {}
        self._idle_marks: dict[bytes, float] = {}
        self._marks_lock = threading.Lock()

    def close(self) -> None:
        self.env.close()

    def sync(self) -> None:
        self.env.sync(True)

    # -- paths ---------------------------------------------------------------------

    def data_path(self, rec: Record) -> Path:
        h = rec.objid.hex()
        return self.directory / "data" / h[:2] / f"{h}.{rec.gen}"

    # -- reading -------------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        with self.env.begin(db=self._obj) as txn:
            raw = txn.get(object_id(key))
        return Record.loads(raw) if raw else None

    def present_blocks(self, rec: Record, first: int, last: int) -> dict[int, int]:
        """{block: crc} of the present blocks in [first, last]."""
        prefix = rec.objid + _U32.pack(rec.gen)
        out: dict[int, int] = {}
        with self.env.begin(db=self._blk) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix + _U32.pack(first)):
                return out
            for k, v in _items(cur):
                if not k.startswith(prefix):
                    break
                idx = _U32.unpack_from(k, 20)[0]
                if idx > last:
                    break
                out[idx] = _CRC.unpack(v)[0]
        return out

    def verified(self, rec: Record, mtime_ns: int, blocks: Iterable[int]) -> set[int]:
        """Those of `blocks` whose checksum some worker checked against the data file while
        the file had modification time `mtime_ns` (see `note_verified`)."""
        out: set[int] = set()
        rows: dict[int, bytes] = {}
        with self.env.begin(db=self._ver) as txn:
            for idx in blocks:
                group, bit = divmod(idx, _VER_GROUP)
                if group not in rows:
                    rows[group] = _ver_bitmap(txn.get(_ver_key(rec, group)), mtime_ns)
                bitmap = rows[group]
                byte = bit // 8
                if byte < len(bitmap) and bitmap[byte] >> bit % 8 & 1:
                    out.add(idx)
        return out

    def note_verified(self, rec: Record, mtime_ns: int, blocks: Iterable[int]) -> None:
        """Record that `blocks` matched their checksums in the data file version
        `mtime_ns`, for every worker of this run of the cache: each block is then read
        back for checking once per version of the file, not once per worker process."""
        groups: dict[int, list[int]] = {}
        for idx in blocks:
            group, bit = divmod(idx, _VER_GROUP)
            groups.setdefault(group, []).append(bit)
        with self.env.begin(write=True, db=self._ver) as txn:
            for group, bits in groups.items():
                key = _ver_key(rec, group)
                bitmap = bytearray(_ver_bitmap(txn.get(key), mtime_ns))
                for bit in bits:
                    if bit // 8 >= len(bitmap):
                        bitmap.extend(bytes(bit // 8 + 1 - len(bitmap)))
                    bitmap[bit // 8] |= 1 << bit % 8
                txn.put(key, _U64.pack(mtime_ns) + bytes(bitmap))

    def inline_hit(self, key: str) -> tuple[bytes, bytes] | None:
        """(raw record, crc32c + content) of a small object, in one read transaction:
        the fast path's only index access."""
        oid = object_id(key)
        with self.env.begin() as txn:
            raw = txn.get(oid, db=self._obj)
            if raw is None:
                return None
            data = txn.get(oid, db=self._inl)
        return (bytes(raw), bytes(data)) if data is not None else None

    def inline_data(self, rec: Record) -> tuple[int, bytes] | None:
        """(crc32c recorded at store time, content) of a small object."""
        with self.env.begin(db=self._inl) as txn:
            raw = txn.get(rec.objid)
        return (_CRC.unpack_from(raw)[0], raw[4:]) if raw is not None else None

    def usage(self) -> int:
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(b"usage")
        return _U64.unpack(raw)[0] if raw else 0

    def objects(self, prefix: str = "", limit: int = 1000) -> Iterator[Record]:
        n = 0
        with self.env.begin(db=self._obj) as txn:
            for _, raw in _items(txn.cursor()):
                rec = Record.loads(raw)
                if rec.key.startswith(prefix):
                    yield rec
                    n += 1
                    if n >= limit:
                        return

    def count(self) -> int:
        with self.env.begin(db=self._obj) as txn:
            return int(txn.stat(self._obj)["entries"])

    def claims_of(self, rec: Record, blocks: list[int]) -> dict[int, bool]:
        """For each block that is claimed: whether the claiming process is alive."""
        prefix = rec.objid + _U32.pack(rec.gen)
        out: dict[int, bool] = {}
        with self.env.begin(db=self._claim) as txn:
            for idx in blocks:
                raw = txn.get(prefix + _U32.pack(idx))
                if raw is not None:
                    out[idx] = self._alive(raw)
        return out

    # -- helpers inside write transactions -------------------------------------------

    def _get_usage(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"usage", db=self._meta)
        return _U64.unpack(raw)[0] if raw else 0

    def _add_usage(self, txn: lmdb.Transaction, delta: int) -> int:
        value = max(0, self._get_usage(txn) + delta)
        txn.put(b"usage", _U64.pack(value), db=self._meta)
        return value

    def _clock(self, txn: lmdb.Transaction) -> float:
        raw = txn.get(b"clock", db=self._meta)
        return _F64.unpack(raw)[0] if raw else 0.0

    def _alive(self, owner: bytes) -> bool:
        pid, start, _ = _OWNER.unpack(owner)
        if pid == self.pid:
            return True
        now = time.monotonic()
        cached = self._liveness.get((pid, start))
        if cached and now - cached[1] < 1.0:
            return cached[0]
        alive = _process_start(pid) == start
        self._liveness[(pid, start)] = (alive, now)
        return alive

    def _put_record(self, txn: lmdb.Transaction, rec: Record, old: Record | None) -> None:
        oid = rec.objid
        if old is not None and not old.pinned:
            txn.delete(_sortable(old.priority) + oid, db=self._ord)
        if not rec.pinned:
            txn.put(_sortable(rec.priority) + oid, b"", db=self._ord)
        txn.put(oid, rec.dumps(), db=self._obj)

    def _drop_object(self, txn: lmdb.Transaction, rec: Record) -> int:
        """Remove an object and all its blocks; returns the bytes freed."""
        oid = rec.objid
        freed = rec.present
        for db in (self._blk, self._ver):
            cur = txn.cursor(db=db)
            if cur.set_range(oid):
                while bytes(cur.key()).startswith(oid):
                    if not cur.delete():
                        break
        # claims of the object's current generation stay accounted to their owners,
        # who discover at commit time that the record is gone and release them
        txn.delete(oid, db=self._inl)
        if not rec.pinned:
            txn.delete(_sortable(rec.priority) + oid, db=self._ord)
        txn.delete(oid, db=self._obj)
        self._add_usage(txn, -freed)
        return freed

    def _is_open(self, txn: lmdb.Transaction, oid: bytes) -> bool:
        cur = txn.cursor(db=self._open)
        if not cur.set_range(oid):
            return False
        for k, _ in _items(cur):
            if not k.startswith(oid):
                return False
            pid = _U32.unpack_from(k, 16)[0]
            if pid == self.pid:
                # this process's mark of a read that has ended does not count
                if oid in self._reading or oid not in self._idle_marks:
                    return True
            elif os.path.exists(f"/proc/{pid}"):
                return True
        return False

    def _has_claims(self, txn: lmdb.Transaction, oid: bytes) -> bool:
        cur = txn.cursor(db=self._claim)
        if not cur.set_range(oid):
            return False
        for k, v in _items(cur):
            if not k.startswith(oid):
                return False
            if self._alive(v):
                return True
        return False

    def _evict(self, txn: lmdb.Transaction, need: int, result: EvictionResult) -> int:
        """Evict lowest-priority objects until `need` bytes are freed (or none is
        left that may go). Returns the bytes freed."""
        freed = 0
        clock = self._clock(txn)
        cur = txn.cursor(db=self._ord)
        if not cur.first():
            return 0
        victims: list[tuple[bytes, bytes]] = []
        for k, _ in _items(cur):
            if freed >= need:
                break
            oid = k[8:]
            if self._is_open(txn, oid) or self._has_claims(txn, oid):
                continue
            raw = txn.get(oid, db=self._obj)
            if raw is None:
                victims.append((k, b""))
                continue
            rec = Record.loads(raw)
            victims.append((k, bytes(raw)))
            freed += rec.present
        for k, raw in victims:
            if not raw:
                txn.delete(k, db=self._ord)
                continue
            rec = Record.loads(raw)
            self._drop_object(txn, rec)
            clock = self.policy.advance(clock, rec.priority)
            result.objects += 1
            result.bytes += rec.present
            if not rec.inline:
                result.files.append(self.data_path(rec))
        txn.put(b"clock", _F64.pack(clock), db=self._meta)
        return freed

    @staticmethod
    def unlink_files(files: list[Path]) -> None:
        for path in files:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # -- writing -------------------------------------------------------------------

    def upsert(
        self,
        key: str,
        *,
        size: int,
        mtime: float | None,
        etag: str | None,
        checksums: dict[str, str],
        block_size: int,
        inline_max: int,
        now: float,
    ) -> Record:
        """The record for an object whose origin identity was just checked: the
        existing one if the version matches (marked validated), else a new generation
        that drops what was cached of the old version."""
        files: list[Path] = []
        oid = object_id(key)
        with self.env.begin(write=True) as txn:
            raw = txn.get(oid, db=self._obj)
            old = Record.loads(raw) if raw else None
            if old is not None and old.same_version(size, mtime, etag):
                old.validated = now
                for algo, value in checksums.items():
                    old.checksums.setdefault(algo, value)
                txn.put(oid, old.dumps(), db=self._obj)
                return old
            gen = 0
            pinned = False
            if old is not None:
                gen = (old.gen + 1) & 0xFFFFFFFF
                pinned = old.pinned
                self._drop_object(txn, old)
                if not old.inline:
                    files.append(self.data_path(old))
            clock = self._clock(txn)
            rec = Record(
                key=key,
                size=size,
                mtime=mtime,
                etag=etag,
                block_size=block_size,
                gen=gen,
                inline=size <= inline_max,
                checksums=dict(checksums),
                pinned=pinned,
                atime=now,
                priority=self.policy.priority(hits=0, last_access=now, clock=clock),
                validated=now,
                created=now,
            )
            self._put_record(txn, rec, None)
        self.unlink_files(files)
        return rec

    def mark_stale(self, key: str) -> None:
        """Force revalidation on next access (origin answered unexpectedly)."""
        oid = object_id(key)
        with self.env.begin(write=True, db=self._obj) as txn:
            raw = txn.get(oid)
            if raw:
                rec = Record.loads(raw)
                rec.validated = 0.0
                txn.put(oid, rec.dumps())

    def claim(self, rec: Record, blocks: list[int]) -> tuple[Claim, EvictionResult]:
        """Claim the blocks of `blocks` that are neither present nor claimed by a live
        process, reserving their bytes (evicting other objects if needed).
        Raises NoSpace when the bytes cannot be reserved."""
        prefix = rec.objid + _U32.pack(rec.gen)
        result = EvictionResult()
        now = time.time()
        owner = self._owner + _F64.pack(now)
        taken: list[int] = []
        nbytes = 0
        with self.env.begin(write=True) as txn:
            if txn.get(rec.objid, db=self._obj) is None:
                return Claim(rec.objid, rec.gen, [], 0), result
            for idx in blocks:
                k = prefix + _U32.pack(idx)
                if txn.get(k, db=self._blk) is not None:
                    continue
                existing = txn.get(k, db=self._claim)
                if existing is not None:
                    if self._alive(existing):
                        continue
                    # the claiming process died: its reservation goes with it
                    self._add_usage(txn, -rec.block_len(idx))
                taken.append(idx)
                nbytes += rec.block_len(idx)
            if not taken:
                return Claim(rec.objid, rec.gen, [], 0), result
            over = self._get_usage(txn) + nbytes - self.size
            if over > 0 and self._evict(txn, over, result) < over:
                txn.abort()
                raise NoSpace(
                    f"cannot reserve {nbytes} bytes: the rest of the cache is pinned or in use"
                )
            for idx in taken:
                txn.put(prefix + _U32.pack(idx), owner, db=self._claim)
            self._add_usage(txn, nbytes)
        return Claim(rec.objid, rec.gen, taken, nbytes), result

    def commit_block(self, rec: Record, idx: int, crc: int) -> bool:
        """Mark a claimed block present. False if the object changed or was dropped
        meanwhile (the bytes written are then garbage and the claim is released)."""
        return self.commit_blocks(rec, [(idx, crc)])

    def commit_blocks(self, rec: Record, blocks: list[tuple[int, int]]) -> bool:
        """Mark claimed blocks [(block, crc32c)] present, in one write transaction.
        False if the object changed or was dropped meanwhile (the bytes written are
        then garbage and the claims are released)."""
        prefix = rec.objid + _U32.pack(rec.gen)
        with self.env.begin(write=True) as txn:
            raw = txn.get(rec.objid, db=self._obj)
            cur = Record.loads(raw) if raw else None
            stale = cur is None or cur.gen != rec.gen
            added = 0
            for idx, crc in blocks:
                k = prefix + _U32.pack(idx)
                length = rec.block_len(idx)
                had_claim = txn.delete(k, db=self._claim)
                if stale:
                    if had_claim:
                        self._add_usage(txn, -length)
                    continue
                if not had_claim:
                    # our claim was taken over (we looked dead): the usage is the new owner's
                    self._add_usage(txn, length)
                if txn.put(k, _CRC.pack(crc), db=self._blk, overwrite=False):
                    added += length
                else:
                    self._add_usage(txn, -length)
            if cur is None or stale:
                return False
            if added:
                cur.present += added
                cur.complete = cur.present >= cur.size
                txn.put(rec.objid, cur.dumps(), db=self._obj)
            rec.present, rec.complete = cur.present, cur.complete
        return True

    def release(self, rec: Record, blocks: list[int]) -> None:
        """Give up claims without data (origin error, cancelled fetch)."""
        prefix = rec.objid + _U32.pack(rec.gen)
        with self.env.begin(write=True) as txn:
            freed = 0
            for idx in blocks:
                k = prefix + _U32.pack(idx)
                raw = txn.get(k, db=self._claim)
                if raw is not None and raw[:12] == self._owner:
                    txn.delete(k, db=self._claim)
                    freed += rec.block_len(idx)
            self._add_usage(txn, -freed)

    def drop_block(self, rec: Record, idx: int) -> None:
        """Forget a block found corrupted, so that it is fetched again."""
        k = rec.objid + _U32.pack(rec.gen) + _U32.pack(idx)
        with self.env.begin(write=True) as txn:
            if not txn.delete(k, db=self._blk):
                return
            raw = txn.get(rec.objid, db=self._obj)
            length = rec.block_len(idx)
            if raw:
                cur = Record.loads(raw)
                if cur.gen == rec.gen:
                    cur.present = max(0, cur.present - length)
                    cur.complete = False
                    txn.put(rec.objid, cur.dumps(), db=self._obj)
            self._add_usage(txn, -length)

    def commit_inline(self, rec: Record, data: bytes, crc: int) -> bool:
        """Store a small object whole (its single block 0 was claimed like any block)."""
        k = rec.objid + _U32.pack(rec.gen) + _U32.pack(0)
        with self.env.begin(write=True) as txn:
            had_claim = txn.delete(k, db=self._claim)
            raw = txn.get(rec.objid, db=self._obj)
            cur = Record.loads(raw) if raw else None
            if cur is None or cur.gen != rec.gen or cur.present:
                if had_claim:
                    self._add_usage(txn, -len(data))
                return cur is not None and cur.gen == rec.gen
            if not had_claim:
                self._add_usage(txn, len(data))
            txn.put(rec.objid, _CRC.pack(crc) + data, db=self._inl)
            cur.present = len(data)
            cur.complete = True
            txn.put(rec.objid, cur.dumps(), db=self._obj)
        rec.present, rec.complete = len(data), True
        return True

    def drop_inline(self, rec: Record) -> None:
        """Forget inline data found corrupted, so that it is fetched again."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(rec.objid, db=self._obj)
            if raw is None or not txn.delete(rec.objid, db=self._inl):
                return
            cur = Record.loads(raw)
            self._add_usage(txn, -cur.present)
            cur.present = 0
            cur.complete = False
            txn.put(rec.objid, cur.dumps(), db=self._obj)

    def set_checksum(self, rec: Record, algorithm: str, value: str) -> None:
        with self.env.begin(write=True, db=self._obj) as txn:
            raw = txn.get(rec.objid)
            if raw:
                cur = Record.loads(raw)
                if cur.gen == rec.gen:
                    cur.checksums[algorithm] = value
                    txn.put(rec.objid, cur.dumps())
        rec.checksums[algorithm] = value

    def record_accesses(self, accesses: dict[bytes, tuple[int, float]]) -> None:
        """Apply batched access counts {objid: (hits, last access)} and re-rank."""
        with self.env.begin(write=True) as txn:
            clock = self._clock(txn)
            for oid, (hits, atime) in accesses.items():
                raw = txn.get(oid, db=self._obj)
                if raw is None:
                    continue
                rec = Record.loads(raw)
                old_rank = _sortable(rec.priority) + oid
                rec.hits += hits
                rec.atime = max(rec.atime, atime)
                rec.priority = self.policy.priority(
                    hits=rec.hits, last_access=rec.atime, clock=clock
                )
                rank = _sortable(rec.priority) + oid
                if not rec.pinned and rank != old_rank:
                    txn.delete(old_rank, db=self._ord)
                    txn.put(rank, b"", db=self._ord)
                txn.put(oid, rec.dumps(), db=self._obj)

    def set_pinned(self, key: str, pinned: bool) -> Record | None:
        oid = object_id(key)
        with self.env.begin(write=True) as txn:
            raw = txn.get(oid, db=self._obj)
            if raw is None:
                return None
            old = Record.loads(raw)
            rec = Record.loads(raw)
            rec.pinned = pinned
            self._put_record(txn, rec, old)
        return rec

    def remove(self, select: Callable[[Record], bool], *, force: bool = False) -> EvictionResult:
        """Drop every object `select` accepts (admin evict and purge). Pinned and open
        objects are kept unless `force`."""
        result = EvictionResult()
        with self.env.begin(write=True) as txn:
            for _, raw in list(_items(txn.cursor(db=self._obj))):
                rec = Record.loads(raw)
                if not select(rec):
                    continue
                if not force and (rec.pinned or self._is_open(txn, rec.objid)):
                    continue
                self._drop_object(txn, rec)
                result.objects += 1
                result.bytes += rec.present
                if not rec.inline:
                    result.files.append(self.data_path(rec))
        self.unlink_files(result.files)
        return result

    def evict(self, need: int) -> EvictionResult:
        result = EvictionResult()
        with self.env.begin(write=True) as txn:
            self._evict(txn, need, result)
        self.unlink_files(result.files)
        return result

    def evict_objects(self, count: int) -> EvictionResult:
        """Evict up to `count` lowest-priority objects regardless of their size (used
        when inodes, not bytes, run short)."""
        result = EvictionResult()
        with self.env.begin(write=True) as txn:
            while result.objects < count:
                before = result.objects
                self._evict(txn, 1, result)
                if result.objects == before:
                    break
        self.unlink_files(result.files)
        return result

    def set_open(self, rec: Record, delta: int) -> None:
        """Count a read of `rec` starting (+1) or ending (-1) in this process. Eviction
        leaves an object alone while any live process has its `open` mark; a mark is
        written when the process starts reading an object it has no mark for, and
        removed by `release_marks` once no read of it has run for a while."""
        oid = rec.objid
        with self._marks_lock:
            count = self._reading.get(oid, 0) + delta
            if count > 0:
                self._reading[oid] = count
                mark = delta > 0 and count == 1 and self._idle_marks.pop(oid, None) is None
            else:
                self._reading.pop(oid, None)
                self._idle_marks[oid] = time.monotonic()
                mark = False
        if mark:
            with self.env.begin(write=True, db=self._open) as txn:
                txn.put(oid + _U32.pack(self.pid), b"")

    def release_marks(self, idle_for: float = 0.0) -> int:
        """Remove the `open` marks of objects this process has not read for `idle_for`
        seconds, in one transaction; returns how many."""
        # The lock is held to the commit: a read starting meanwhile must either find
        # its mark kept or write a new one after this transaction removed the old.
        with self._marks_lock:
            cutoff = time.monotonic() - idle_for
            gone = [oid for oid, since in self._idle_marks.items() if since <= cutoff]
            if not gone:
                return 0
            suffix = _U32.pack(self.pid)
            with self.env.begin(write=True, db=self._open) as txn:
                for oid in gone:
                    txn.delete(oid + suffix)
            for oid in gone:
                del self._idle_marks[oid]
        return len(gone)

    # -- maintenance -----------------------------------------------------------------

    def forget_process(self, pid: int) -> None:
        """Release the claims and open marks of a process that is gone."""
        with self.env.begin(write=True) as txn:
            freed = 0
            for k, v in list(_items(txn.cursor(db=self._claim))):
                if _OWNER.unpack(v)[0] == pid:
                    txn.delete(k, db=self._claim)
                    raw = txn.get(k[:16], db=self._obj)
                    if raw:
                        freed += Record.loads(raw).block_len(_U32.unpack_from(k, 20)[0])
            self._add_usage(txn, -freed)
            for k, _ in list(_items(txn.cursor(db=self._open))):
                if _U32.unpack_from(k, 16)[0] == pid:
                    txn.delete(k, db=self._open)

    def recover(self) -> dict[str, int]:
        """Run at startup when no worker is alive: drop every claim and open mark,
        recount present bytes from the blocks, and recompute usage."""
        stats = {"claims": 0, "objects": 0, "usage": 0}
        with self.env.begin(write=True) as txn:
            stats["claims"] = int(txn.stat(self._claim)["entries"])
            txn.drop(self._claim, delete=False)
            txn.drop(self._open, delete=False)
            # a new run checks every block again once (bit rot leaves the mtime alone)
            txn.drop(self._ver, delete=False)
            usage = 0
            blk = txn.cursor(db=self._blk)
            for oid, raw in list(_items(txn.cursor(db=self._obj))):
                rec = Record.loads(raw)
                if rec.inline:
                    present = rec.present
                else:
                    present = 0
                    prefix = oid + _U32.pack(rec.gen)
                    if blk.set_range(prefix):
                        for k, _ in blk:
                            if not k.startswith(prefix):
                                break
                            present += rec.block_len(_U32.unpack_from(k, 20)[0])
                if present != rec.present:
                    rec.present = present
                    rec.complete = present >= rec.size
                    txn.put(oid, rec.dumps(), db=self._obj)
                usage += present
                stats["objects"] += 1
            txn.put(b"usage", _U64.pack(usage), db=self._meta)
            stats["usage"] = usage
        return stats

    def info(self) -> dict[str, Any]:
        with self.env.begin() as txn:
            return {
                "objects": int(txn.stat(self._obj)["entries"]),
                "blocks": int(txn.stat(self._blk)["entries"]),
                "inline_objects": int(txn.stat(self._inl)["entries"]),
                "fetching_blocks": int(txn.stat(self._claim)["entries"]),
                "usage_bytes": self._get_usage(txn),
                "clock": self._clock(txn),
            }
