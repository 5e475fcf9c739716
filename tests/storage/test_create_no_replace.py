"""Storage.create: store a new object, never replacing one that appeared meanwhile.

Posix commits with link(2), which fails atomically when the name is taken; the generic
default (used by backends without an atomic create-if-absent) looks for the name after
the last byte, right before the commit. Both are run here on a real directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from stashflow.integration.storage import AlreadyExists, ObjectInfo, Storage
from stashflow.integration.storage.posix import TEMP_MARKER, PosixStorage

Create = Callable[[PosixStorage, str, AsyncIterator[bytes]], Awaitable[ObjectInfo]]


async def _posix_create(s: PosixStorage, path: str, data: AsyncIterator[bytes]) -> ObjectInfo:
    return await s.create(path, data)


async def _generic_create(s: PosixStorage, path: str, data: AsyncIterator[bytes]) -> ObjectInfo:
    # The base-class implementation, on a real backend.
    return await Storage.create(s, path, data)


CREATES = pytest.mark.parametrize(
    "create", [_posix_create, _generic_create], ids=["posix", "generic"]
)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def _racing_upload(target: Path, other: bytes, chunks: int = 4) -> AsyncIterator[bytes]:
    """An upload during which another writer creates the same object."""
    for i in range(chunks):
        if i == chunks // 2:
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(target.write_bytes, other)
        yield bytes([i]) * 65536


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


@CREATES
async def test_create_stores_a_new_object(tmp_path: Path, create: Create) -> None:
    s = PosixStorage(f"file://{tmp_path}")
    info = await create(s, "d/new.bin", _body(b"fresh"))
    assert info.size == 5 and (tmp_path / "d" / "new.bin").read_bytes() == b"fresh"
    assert _files(tmp_path) == ["d/new.bin"]


@CREATES
async def test_create_refuses_an_existing_object(tmp_path: Path, create: Create) -> None:
    s = PosixStorage(f"file://{tmp_path}")
    (tmp_path / "old.bin").write_bytes(b"keep me")
    with pytest.raises(AlreadyExists) as caught:
        await create(s, "old.bin", _body(b"intruder"))
    assert "already exists" in str(caught.value)
    assert (tmp_path / "old.bin").read_bytes() == b"keep me"
    assert _files(tmp_path) == ["old.bin"]


@CREATES
async def test_create_does_not_replace_an_object_created_during_the_upload(
    tmp_path: Path, create: Create
) -> None:
    s = PosixStorage(f"file://{tmp_path}")
    target = tmp_path / "race" / "obj.bin"
    with pytest.raises(AlreadyExists):
        await create(s, "race/obj.bin", _racing_upload(target, b"the other writer's"))
    assert target.read_bytes() == b"the other writer's"
    assert not any(TEMP_MARKER in name for name in _files(tmp_path))
    assert _files(tmp_path) == ["race/obj.bin"]


async def test_write_still_replaces(tmp_path: Path) -> None:
    s = PosixStorage(f"file://{tmp_path}")
    target = tmp_path / "obj.bin"
    await s.write("obj.bin", _racing_upload(target, b"replaced"))
    assert target.read_bytes() == b"".join(bytes([i]) * 65536 for i in range(4))
    assert _files(tmp_path) == ["obj.bin"]
