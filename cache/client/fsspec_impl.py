"""An fsspec filesystem for `stash://` and `osdf://` URLs.

    import pandas as pd
    df = pd.read_csv("osdf:///ns/run42/table.csv")
    fs = fsspec.filesystem("stash", director="https://director.example:8444")
    with fs.open("/ns/run42/input.root", "rb") as f:
        header = f.read(1024)   # ranged GETs through the nearest cache

Reads go through the director's caches with the same failover as `stashcp` (the
transfer engine is shared); listings use PROPFIND via the namespace's collections URL;
`put` uploads to the origin. Storage options: `director`, `caches` (a list of cache
URLs, as `--cache`), `origin` (without a director: where listings and uploads go),
`token`, and any transfer option of `Options` (e.g. `chunk_size`).
The filesystem is registered through the `fsspec.specs` entry points `stash` and `osdf`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from fsspec.asyn import AsyncFileSystem, sync, sync_wrapper
from fsspec.spec import AbstractBufferedFile

from stashflow.cache.client.discovery import Remote
from stashflow.cache.client.errors import AuthError, NotFound, StashError
from stashflow.cache.client.transfer import Client, Options


def _os_error(e: StashError) -> OSError:
    if isinstance(e, NotFound):
        return FileNotFoundError(2, str(e))
    if isinstance(e, AuthError):
        return PermissionError(13, str(e))
    return OSError(5, str(e))


class StashFileSystem(AsyncFileSystem):
    protocol = ("stash", "osdf")
    root_marker = "/"
    async_impl = True

    def __init__(
        self,
        director: str | None = None,
        caches: list[str] | str | None = None,
        token: str | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        **options: Any,
    ) -> None:
        known = {k: v for k, v in options.items() if k in Options.__dataclass_fields__}
        rest = {k: v for k, v in options.items() if k not in known}
        super().__init__(asynchronous=asynchronous, loop=loop, **rest)
        self.options = Options.load(director=director, caches=caches, token=token, **known)
        self._client: Client | None = None

    # the client lives in fsspec's event loop
    def client(self) -> Client:
        if self._client is None:
            opts = Options(**{k: getattr(self.options, k) for k in Options.__dataclass_fields__})
            self._client = Client(opts)
        return self._client

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = str(path)
        for proto in cls.protocol:
            if text.startswith(f"{proto}://"):
                text = text[len(proto) + 3 :]
                break
        text = "/" + text.lstrip("/")
        return text.rstrip("/") or "/"

    def unstrip_protocol(self, name: str) -> str:
        return f"stash://{name if name.startswith('/') else '/' + name}"

    @staticmethod
    def _remote(path: str) -> Remote:
        return Remote("stash", path)

    def _can_list(self) -> bool:
        o = self.options
        return bool(o.origin or o.director or not o.caches)

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """A listing (PROPFIND, Depth 0) when one is reachable, as it tells files from
        collections; else a HEAD through the caches."""
        path = self._strip_protocol(path)
        client = self.client()
        if self._can_list():
            try:
                me, _ = await client.propfind(self._remote(path), depth=0)
            except NotFound:
                raise FileNotFoundError(2, f"{path}: not found") from None
            except StashError:
                me = None  # no listing here: ask the caches
            if me is not None:
                return {
                    "name": path,
                    "size": me.size if not me.is_dir else 0,
                    "type": "directory" if me.is_dir else "file",
                    "mtime": me.mtime,
                }
        try:
            st = await client.stat(self._remote(path))
        except StashError as e:
            raise _os_error(e) from None
        return {"name": path, "size": st["size"], "type": "file", "etag": st.get("etag")}

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        try:
            me, children = await self.client().propfind(self._remote(path), depth=1)
        except StashError as e:
            raise _os_error(e) from None
        if me is not None and not me.is_dir and not children:
            entries = [me]
        else:
            entries = children
        out = [
            {
                "name": e.path,
                "size": e.size if not e.is_dir else 0,
                "type": "directory" if e.is_dir else "file",
                "mtime": e.mtime,
            }
            for e in sorted(entries, key=lambda e: e.path)
        ]
        return out if detail else [o["name"] for o in out]

    async def _cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        path = self._strip_protocol(path)
        client = self.client()
        try:
            if start is None and end is None:
                start, end = 0, 1 << 62
            else:
                if (start is not None and start < 0) or (end is not None and end < 0):
                    size = (await client.stat(self._remote(path)))["size"] or 0
                    start = size + start if start is not None and start < 0 else start
                    end = size + end if end is not None and end < 0 else end
                start = max(0, start or 0)
                end = 1 << 62 if end is None else end
            return await client.read(self._remote(path), start, end)
        except StashError as e:
            raise _os_error(e) from None

    async def _get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        rpath = self._strip_protocol(rpath)
        if await asyncio.to_thread(os.path.isdir, lpath):
            return
        result = await self.client().download(self._remote(rpath), Path(lpath))
        if result.error is not None:
            raise _os_error(result.error)

    async def _put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        rpath = self._strip_protocol(rpath)
        if await asyncio.to_thread(os.path.isdir, lpath):
            return
        result = await self.client().upload(Path(lpath), self._remote(rpath))
        if result.error is not None:
            raise _os_error(result.error)

    async def _mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        try:
            await self.client().mkcol(self._remote(self._strip_protocol(path)))
        except StashError as e:
            raise _os_error(e) from None

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        await self._mkdir(path)

    async def _exists(self, path: str, **kwargs: Any) -> bool:
        try:
            await self._info(path)
            return True
        except FileNotFoundError:
            return False

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    close = sync_wrapper(_close)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> StashFile:
        return StashFile(
            self,
            self._strip_protocol(path),
            mode=mode,
            block_size=block_size or 4 * 1024 * 1024,
            autocommit=autocommit,
            cache_options=cache_options,
            **kwargs,
        )


class StashFile(AbstractBufferedFile):
    """Reads by ranged GETs (fsspec's read-ahead cache in front); writes buffer in a
    local temporary file and upload on close."""

    def __init__(self, fs: StashFileSystem, path: str, mode: str = "rb", **kwargs: Any) -> None:
        self._tmp: Any = None
        super().__init__(fs, path, mode=mode, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        data: bytes = sync(self.fs.loop, self.fs._cat_file, self.path, start, end)
        return data

    def _initiate_upload(self) -> None:
        self._tmp = tempfile.NamedTemporaryFile(prefix="stash-upload-", delete=False)

    def _upload_chunk(self, final: bool = False) -> bool:
        assert self._tmp is not None
        self.buffer.seek(0)
        self._tmp.write(self.buffer.read())
        if final:
            self._tmp.close()
            try:
                sync(self.fs.loop, self.fs._put_file, self._tmp.name, self.path)
            finally:
                os.unlink(self._tmp.name)
        return True

    def discard(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp.name)


def _register() -> None:
    """Register without the entry point (for environments installed before it)."""
    import fsspec

    for proto in StashFileSystem.protocol:
        fsspec.register_implementation(proto, StashFileSystem, clobber=True)


__all__ = ["StashFile", "StashFileSystem"]
