"""The least a Python download client can do, for the issue 3 benchmark (information only).

    python benchmarks/pycurl_floor.py LIST DIR

LIST holds one URL per line; each object is written to DIR/<last path segment>. This is
what stashcp's first pass does for many small files, with nothing else: libcurl's multi
interface (pycurl), 16 transfers in one thread, each body written into a hidden part
file and its crc32c computed on the way, compared with the `Digest` the server sends,
and the part file renamed into place. No options, no configuration, no token, no
director, no fallback, no progress, no report: whatever goes wrong ends the run with
exit status 1. Its wall time, next to curl's and stashcp's, tells how much of stashcp's
gap to curl is the Python interpreter and pycurl themselves and how much is stashcp.
"""

from __future__ import annotations

import base64
import os
import sys

import crc32c
import pycurl

PARALLEL = 16


class Download:
    __slots__ = ("crc", "dest", "digest", "fd", "part")

    def __init__(self, url: str, outdir: str) -> None:
        name = url.rsplit("/", 1)[1]
        self.dest = os.path.join(outdir, name)
        self.part = os.path.join(outdir, f".{name}.part")
        self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.crc = 0
        self.digest = ""

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)
        self.crc = crc32c.crc32c(data, self.crc)

    def header(self, line: bytes) -> None:
        if line[:7].lower() == b"digest:":
            self.digest = line[7:].decode("latin-1").strip()

    def finish(self, curl: pycurl.Curl) -> None:
        os.close(self.fd)
        status = curl.getinfo(pycurl.RESPONSE_CODE)
        if status != 200:
            raise SystemExit(f"{self.dest}: HTTP {status}")
        expected = next((v for k, _, v in (d.partition("=") for d in self.digest.split(","))
                         if k.strip().lower() == "crc32c"), None)
        actual = base64.b64encode(self.crc.to_bytes(4, "big")).decode()  # RFC 3230
        if expected is None or expected.strip() != actual:
            raise SystemExit(f"{self.dest}: crc32c {actual}, server says {expected}")
        os.replace(self.part, self.dest)


def main() -> None:
    with open(sys.argv[1]) as f:
        urls = [line.strip() for line in f if line.strip()]
    outdir = sys.argv[2]
    multi = pycurl.CurlMulti()
    idle = []
    for _ in range(PARALLEL):
        c = pycurl.Curl()
        c.setopt(pycurl.BUFFERSIZE, 256 * 1024)
        c.setopt(pycurl.HTTPHEADER, ["Want-Digest: crc32c"])
        idle.append(c)
    pending = iter(urls)
    running: dict[int, tuple[pycurl.Curl, Download]] = {}
    more = True
    while True:
        while idle and more:
            url = next(pending, None)
            if url is None:
                more = False
                break
            c, d = idle.pop(), Download(url, outdir)
            c.setopt(pycurl.URL, url)
            c.setopt(pycurl.WRITEFUNCTION, d.write)
            c.setopt(pycurl.HEADERFUNCTION, d.header)
            multi.add_handle(c)
            running[id(c)] = (c, d)
        if not running:
            break
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        _, ok, failed = multi.info_read()
        if failed:
            raise SystemExit(f"transfer failed: {failed[0][2]}")
        for c in ok:
            _, d = running.pop(id(c))
            multi.remove_handle(c)
            d.finish(c)
            idle.append(c)
        if not ok:
            multi.select(0.2)


if __name__ == "__main__":
    main()
