"""A real HTTP origin that misbehaves on request, for the cache's failure tests.

/ok/<file>        a correct origin (HEAD, GET, Range)
/truncate/<file>  promises the full length, sends half, closes the connection
/slow/<file>      sends 1 KiB per second
/hang/<file>      answers HEAD, never answers GET
/hanghead/<file>  never answers at all
/hold/<file>      sends up to HOLD_AT bytes of the file, then creates MARKER and holds
                  the response until the process is killed: a cache in front of it can
                  deliver the first part of an object and no more, with no timing

    python origin_app.py PORT ROOT [HOLD_AT MARKER]
"""

from __future__ import annotations

import asyncio
import email.utils
import sys
from pathlib import Path

from aiohttp import web


def main(port: int, root: Path, hold_at: int = 0, marker: Path | None = None) -> None:
    never = asyncio.Event()  # nothing sets it: held responses wait for the kill

    async def handle(request: web.Request) -> web.StreamResponse:
        mode, _, rel = request.match_info["path"].partition("/")
        path = root / rel
        if mode == "hanghead":
            await asyncio.sleep(3600)
        if not path.is_file():
            raise web.HTTPNotFound()
        data = path.read_bytes()
        st = path.stat()
        headers = {
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "ETag": f'"{st.st_size:x}-{st.st_mtime_ns:x}"',
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(headers=headers)
        if mode == "hang":
            await asyncio.sleep(3600)
        first, last, status = 0, len(data) - 1, 200
        rng = request.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            first, last = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        body = data[first : last + 1]
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        if mode == "truncate":
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        if mode == "hold":
            assert marker is not None, "start with HOLD_AT and MARKER for /hold/"
            pos, i = first, 0
            while i < len(body):
                if pos >= hold_at:
                    await asyncio.to_thread(marker.touch)
                    await never.wait()
                n = min(256 << 10, len(body) - i, hold_at - pos)  # never past HOLD_AT
                await resp.write(body[i : i + n])
                i, pos = i + n, pos + n
        elif mode == "slow":
            for i in range(0, len(body), 1024):
                await resp.write(body[i : i + 1024])
                await asyncio.sleep(1)
        else:
            await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    held = (int(sys.argv[3]), Path(sys.argv[4])) if len(sys.argv) > 4 else (0, None)
    main(int(sys.argv[1]), Path(sys.argv[2]), *held)
