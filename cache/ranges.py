"""HTTP byte ranges (RFC 9110 section 14): parsing `Range` and building multipart bodies."""

from __future__ import annotations

import re
import secrets

MAX_RANGES = 64
_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


class RangeError(ValueError):
    """The Range header is malformed (400)."""


class Unsatisfiable(ValueError):
    """No requested range overlaps the object (416)."""


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """Inclusive (first, last) byte positions requested, or None to send everything.

    Unsatisfiable parts are dropped; if none remains, Unsatisfiable is raised.
    Overlapping or adjacent ranges are coalesced, which RFC 9110 allows and which keeps
    a client from making us send the same bytes many times."""
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise RangeError(f"unsupported Range header {header[:80]!r}: only 'bytes=' ranges")
    parts = specs.split(",")
    if len(parts) > MAX_RANGES:
        raise RangeError(f"too many ranges ({len(parts)} > {MAX_RANGES})")
    out: list[tuple[int, int]] = []
    for part in parts:
        m = _SPEC.match(part)
        if not m or (not m.group(1) and not m.group(2)):
            raise RangeError(f"malformed byte range {part.strip()[:40]!r}")
        first_s, last_s = m.group(1), m.group(2)
        if first_s:
            first = int(first_s)
            last = int(last_s) if last_s else max(first, size - 1)
            if last < first:
                raise RangeError(f"malformed byte range {part.strip()!r}: last < first")
            if first >= size:
                continue
            out.append((first, min(last, size - 1)))
        else:
            suffix = int(last_s)
            if suffix == 0 or size == 0:
                continue
            out.append((max(0, size - suffix), size - 1))
    if not out:
        raise Unsatisfiable(f"no range of {header[:80]!r} lies within {size} bytes")
    out.sort()
    merged = [out[0]]
    for first, last in out[1:]:
        if first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def multipart_layout(
    ranges: list[tuple[int, int]], size: int, content_type: str
) -> tuple[str, list[bytes], bytes, int]:
    """Boundary, the part headers preceding each range, the closing delimiter, and
    the total body length of a multipart/byteranges response."""
    boundary = secrets.token_hex(12)
    heads = [
        (
            f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n"
        ).encode()
        for first, last in ranges
    ]
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = sum(len(h) for h in heads) + len(tail) + sum(b - a + 1 for a, b in ranges)
    return boundary, heads, tail, length
