"""Checksum algorithms used across the suite, in one place.

Storage and the cache keep checksums as lowercase hex. In RFC 3230 `Digest` headers
(IANA's HTTP digest algorithm registry) adler32 is 8 hex digits, while md5, sha-256 and
crc32c are base64 of the big-endian digest bytes, as XRootD sends them too;
`to_digest_header` and `from_digest_header` translate (and accept hex crc32c as well).
"""

from __future__ import annotations

import base64
import hashlib
import zlib

import crc32c as _crc32c

ALGORITHMS = ("adler32", "md5", "crc32c", "sha256")
# RFC 3230 names <-> our names
_HTTP_NAMES = {"adler32": "adler32", "md5": "md5", "crc32c": "crc32c", "sha-256": "sha256"}
_OUR_TO_HTTP = {v: k for k, v in _HTTP_NAMES.items()}


class Hasher:
    """Incremental checksum with one interface for all supported algorithms."""

    def __init__(self, algorithm: str) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._value = 1 if algorithm == "adler32" else 0
        self._hash = hashlib.new(algorithm) if algorithm in ("md5", "sha256") else None

    def update(self, data: bytes | memoryview) -> None:
        if self._hash is not None:
            self._hash.update(data)
        elif self.algorithm == "adler32":
            self._value = zlib.adler32(data, self._value)
        else:
            self._value = _crc32c.crc32c(data, self._value)

    def hexdigest(self) -> str:
        if self._hash is not None:
            return self._hash.hexdigest()
        return f"{self._value & 0xFFFFFFFF:08x}"


def block_crc(data: bytes | memoryview) -> int:
    """Fast per-block integrity checksum (hardware crc32c)."""
    return int(_crc32c.crc32c(data))


def http_name(algorithm: str) -> str:
    return _OUR_TO_HTTP[algorithm]


def our_name(http_algorithm: str) -> str | None:
    return _HTTP_NAMES.get(http_algorithm.strip().lower())


def to_digest_header(algorithm: str, hexvalue: str) -> str:
    """`Digest:` value for one algorithm, e.g. 'md5=XUFAKrxLKna5cZ2REBfFkg=='."""
    if algorithm in ("md5", "sha256", "crc32c"):
        value = base64.b64encode(bytes.fromhex(hexvalue)).decode()
    else:
        value = hexvalue
    return f"{http_name(algorithm)}={value}"


def from_digest_header(header: str) -> dict[str, str]:
    """Parse a `Digest:` header into {our algorithm name: lowercase hex}."""
    out: dict[str, str] = {}
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        algo = our_name(name)
        if not sep or algo is None:
            continue
        value = value.strip()
        try:
            if algo == "crc32c" and len(value) == 8 and not value.endswith("="):
                out[algo] = f"{int(value, 16):08x}"
            elif algo in ("md5", "sha256", "crc32c"):
                out[algo] = base64.b64decode(value, validate=True).hex()
            else:
                out[algo] = f"{int(value, 16):08x}"
        except ValueError:
            continue
    return out


def parse_want_digest(header: str) -> list[str]:
    """Algorithms from a `Want-Digest:` header that we support, best q-value first."""
    ranked: list[tuple[float, int, str]] = []
    for i, item in enumerate(header.split(",")):
        name, _, params = item.strip().partition(";")
        algo = our_name(name)
        if algo is None:
            continue
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if q > 0:
            ranked.append((-q, i, algo))
    return [a for _, _, a in sorted(ranked)]
