"""The fsspec filesystem for stash:// and osdf:// against real caches, and pandas
reading through it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from stashflow.cache.client.fsspec_impl import StashFileSystem
from tests.cache.harness import CacheProcess
from tests.client.conftest import dead_url


def _fresh_interpreter(code: str) -> str:
    """Run `code` in a new Python that has imported nothing of ours, from a neutral
    directory: what a user's script sees."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_stash_protocol_resolves_through_the_entry_point() -> None:
    """No fallback registration: `stash` must come from the `fsspec.specs` entry point
    declared in pyproject.toml, in a process that never imported stashflow."""
    name = _fresh_interpreter(
        "import sys, fsspec\n"
        "cls = fsspec.get_filesystem_class('stash')\n"
        "print(cls.__module__ + '.' + cls.__qualname__)\n"
    )
    assert name == "stashflow.cache.client.fsspec_impl.StashFileSystem"
    assert fsspec.get_filesystem_class("stash") is StashFileSystem


def test_osdf_goes_to_the_first_listed_entry_point_unless_registered() -> None:
    """`osdf` is claimed by us and by pelicanfs: fsspec keeps the first `osdf` entry
    point importlib.metadata lists and skips the others (docs/stashcp.md), and an
    explicit register_implementation(..., clobber=True) picks ours whatever the order."""
    first = _fresh_interpreter(
        "from importlib.metadata import entry_points\n"
        "print(next(e.value for e in entry_points(group='fsspec.specs') if e.name == 'osdf'))"
    )
    resolved = _fresh_interpreter(
        "import fsspec\n"
        "cls = fsspec.get_filesystem_class('osdf')\n"
        "print(cls.__module__ + ':' + cls.__qualname__)\n"
    )
    assert resolved == first
    picked = _fresh_interpreter(
        "import fsspec\n"
        "fsspec.register_implementation('osdf', "
        "'stashflow.cache.client.fsspec_impl.StashFileSystem', clobber=True)\n"
        "print(fsspec.get_filesystem_class('osdf').__qualname__)\n"
    )
    assert picked == "StashFileSystem"


@pytest.fixture
def fs(cache: CacheProcess) -> Iterator[StashFileSystem]:
    f = fsspec.filesystem("stash", caches=[dead_url(), cache.url], skip_instance_cache=True)
    assert isinstance(f, StashFileSystem)
    yield f
    f.close()


def test_open_read_seek(fs: StashFileSystem, origin_dir: Path) -> None:
    data = (origin_dir / "medium.bin").read_bytes()
    with fs.open("stash:///ns/medium.bin", "rb", block_size=256 * 1024) as f:
        assert f.read(100) == data[:100]
        f.seek(2 * 1024 * 1024 + 3)
        assert f.read(5000) == data[2 * 1024 * 1024 + 3 : 2 * 1024 * 1024 + 5003]
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]


def test_cat_file_ranges_and_info(fs: StashFileSystem, origin_dir: Path) -> None:
    data = (origin_dir / "medium.bin").read_bytes()
    assert fs.cat_file("/ns/medium.bin", start=10, end=20) == data[10:20]
    assert fs.cat_file("osdf:///ns/medium.bin", start=-7) == data[-7:]
    assert fs.cat_file("/ns/small.txt") == b"hello stashflow\n"
    info = fs.info("stash:///ns/medium.bin")
    assert info["size"] == len(data) and info["type"] == "file"
    with pytest.raises(FileNotFoundError):
        fs.cat_file("/ns/nope")
    assert not fs.exists("/ns/nope")


def test_get_file(fs: StashFileSystem, origin_dir: Path, tmp_path: Path) -> None:
    fs.get("stash:///ns/medium.bin", str(tmp_path / "m.bin"))
    assert (tmp_path / "m.bin").read_bytes() == (origin_dir / "medium.bin").read_bytes()


def test_pandas_csv_and_parquet(cache: CacheProcess, origin_dir: Path) -> None:
    import pandas as pd  # the test extra installs pandas and pyarrow: no skipping
    df = pd.read_csv("stash:///ns/table.csv", storage_options={"caches": [cache.url]})
    assert len(df) == 500 and list(df.columns) == ["id", "name", "value"]
    assert df["value"].sum() == pytest.approx(sum(i * 1.5 for i in range(500)))
    frame = pd.DataFrame({"x": range(10000), "y": [f"v{i}" for i in range(10000)]})
    frame.to_parquet(origin_dir / "frame.parquet")
    back = pd.read_parquet("stash:///ns/frame.parquet", storage_options={"caches": [cache.url]})
    assert back.equals(frame)
