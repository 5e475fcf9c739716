"""A real HTTP origin (HEAD, GET, Range) that serves each file freely up to a byte
offset and then holds every response there, until the process is killed.

A cache in front of it can therefore deliver the first part of an object and no more:
a client reading through that cache stays mid-transfer for as long as the test wants,
with no timing involved. When a response reaches the offset, the marker file is
created, so the test knows the cache has been given everything it can serve.

    python gated_origin.py PORT ROOT HOLD_AT MARKER
"""

from __future__ import annotations

import asyncio
import email.utils
import sys
from pathlib import Path

from aiohttp import web

PIECE = 256 * 1024


def main(port: int, root: Path, hold_at: int, marker: Path) -> None:
    never = asyncio.Event()  # nothing sets it: held responses wait for the kill

    async def handle(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["path"]
        if not path.is_file():
            raise web.HTTPNotFound()
        st = path.stat()
        size = st.st_size
        headers = {
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "ETag": f'"{size:x}-{st.st_mtime_ns:x}"',
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(size)
            return web.Response(headers=headers)
        first, last, status = 0, size - 1, 200
        rng = request.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            first, last = int(a), min(int(b) if b else size - 1, size - 1)
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = last + 1 - first
        await resp.prepare(request)
        with path.open("rb") as f:
            pos = first
            while pos <= last:
                if pos >= hold_at:
                    await asyncio.to_thread(marker.touch)
                    await never.wait()
                # never cross the hold offset in one write
                n = min(PIECE, last + 1 - pos, hold_at - pos)
                f.seek(pos)
                await resp.write(f.read(n))
                pos += n
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
