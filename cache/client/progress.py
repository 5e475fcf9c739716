"""One progress line on a terminal (bytes, rate, ETA, files); nothing in a pipe."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Counters updated by the transfer engine; `run()` draws them while enabled."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_bytes = 0
        self.done_bytes = 0
        self.files_total = 0
        self.files_done = 0
        self.started = time.monotonic()
        self._drawn = False

    def add_total(self, n: int) -> None:
        self.total_bytes += n

    def add(self, n: int) -> None:
        self.done_bytes += n

    def file_done(self) -> None:
        self.files_done += 1

    def line(self) -> str:
        elapsed = max(1e-6, time.monotonic() - self.started)
        rate = self.done_bytes / elapsed
        parts = [f"{human(self.done_bytes)}"]
        if self.total_bytes:
            pct = min(100.0, 100.0 * self.done_bytes / self.total_bytes)
            parts[0] += f" / {human(self.total_bytes)} ({pct:.0f}%)"
        parts.append(f"{human(rate)}/s")
        if self.total_bytes and rate > 0 and self.done_bytes < self.total_bytes:
            eta = (self.total_bytes - self.done_bytes) / rate
            parts.append(f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
        if self.files_total > 1:
            parts.append(f"{self.files_done}/{self.files_total} files")
        return "  ".join(parts)

    def draw(self) -> None:
        if not self.enabled:
            return
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """Leave the final state on its own line."""
        if self.enabled and self._drawn:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    async def run(self, interval: float = 0.25) -> None:
        if not self.enabled:
            return
        try:
            while True:
                self.draw()
                await asyncio.sleep(interval)
        finally:
            self.finish()
