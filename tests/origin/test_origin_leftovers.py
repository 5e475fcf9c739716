"""What a crashed or failed upload leaves on a posix export, and what the origin
cleans: stale temp files at start, new directories of a failed upload at once. Real
origin processes (`stashflow origin serve`), real storage."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stashflow.integration.checksums import to_digest_header
from stashflow.integration.storage import open_storage
from stashflow.integration.storage.posix import TEMP_MARKER
from tests.origin.harness import AUDIENCE, Issuer, OriginProcess, leftovers


def test_stale_upload_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    """A kill -9 during an upload leaves `.NAME.stashflow-tmp-HEX`: the next origin
    start removes those not written for an hour, and says so; a fresh one (a live
    upload of another process on shared storage) and ordinary files stay."""
    data = tmp_path / "data"
    (data / "deep" / "er").mkdir(parents=True)
    stale = data / "deep" / "er" / f".obj.bin{TEMP_MARKER}0123456789ab"
    fresh = data / "deep" / f".live.bin{TEMP_MARKER}ba9876543210"
    kept = data / "deep" / ".hidden-but-mine"
    for p in (stale, fresh, kept):
        p.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    for p in (stale, kept):
        os.utime(p, (two_hours_ago, two_hours_ago))
    with OriginProcess(
        ["--export", f"/ns=file://{data}", "--public-export", "/ns"], tmp_path / "logs"
    ) as origin:
        assert origin.call("GET", "/ns/deep/.hidden-but-mine").status == 200
        log = origin.log.read_text()
    assert leftovers(data) == sorted(str(p.relative_to(data)) for p in (fresh, kept))
    assert "removed 1 stale upload temp file(s)" in log and "deep/er/.obj.bin" in log


def test_a_failed_upload_into_a_new_directory_leaves_no_directory(tmp_path: Path) -> None:
    """PUT into directories that do not exist yet, with a Digest the data does not
    match: refused, and the directories it created are gone again; directories that
    existed before stay."""
    data = tmp_path / "data"
    (data / "existing").mkdir(parents=True)
    issuer = Issuer(tmp_path / "keys")
    args = [
        "--export", f"/ns=file://{data}", "--issuer", issuer.issuer,
        "--jwks", str(issuer.jwks), "--audience", AUDIENCE,
    ]  # fmt: skip
    with OriginProcess(args, tmp_path / "logs") as origin:
        token = issuer.token("storage.create:/ns")
        wrong = to_digest_header("crc32c", "00000000")
        r = origin.call(
            "PUT", "/ns/existing/new/deeper/x.bin", token=token,
            headers={"Digest": wrong}, data=b"some bytes",
        )  # fmt: skip
        assert r.status >= 400, r.body
        assert leftovers(data) == []
        assert sorted(p.name for p in data.rglob("*")) == ["existing"]
        # the same upload done right creates them
        r = origin.call("PUT", "/ns/existing/new/deeper/x.bin", token=token, data=b"ok")
        assert r.status == 201, r.body
        assert (data / "existing" / "new" / "deeper" / "x.bin").read_bytes() == b"ok"


def test_posix_storage_failed_write_removes_only_what_it_created(tmp_path: Path) -> None:
    """The storage layer itself: a data source that fails mid-way leaves neither the
    temp file nor the new directories."""

    async def main() -> None:
        storage = open_storage(f"file://{tmp_path}")

        async def broken() -> AsyncIterator[bytes]:
            yield b"first"
            raise RuntimeError("client went away")

        with pytest.raises(RuntimeError):
            await storage.create("a/b/c/obj.bin", broken())
        await storage.close()

    (tmp_path / "a").mkdir()
    asyncio.run(main())
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a"]
