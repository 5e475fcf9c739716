"""`stashcp` as an HTCondor multi-file transfer plugin, driven exactly as the starter
drives it: `-classad`, then `-infile IN -outfile OUT` with a pre-allocated OUT."""

from __future__ import annotations

from pathlib import Path

from stashflow.cache.client.condor import format_ad, get_attr, parse_ads
from stashflow.cache.client.errors import EXIT_NOT_FOUND, EXIT_OK
from tests.cache.harness import CacheProcess
from tests.client.conftest import access_log, stashcp


def test_capability_ad() -> None:
    r = stashcp("-classad")
    assert r.code == EXIT_OK
    (ad,) = parse_ads(r.stdout)
    assert ad["MultipleFileSupport"] is True
    assert ad["PluginType"] == "FileTransfer"
    assert ad["SupportedMethods"] == "stash,osdf,pelican"
    assert isinstance(ad["PluginVersion"], str) and ad["ProtocolVersion"] == 2


def test_three_files_one_missing(cache: CacheProcess, origin_dir: Path, tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    urls = [
        ("stash:///ns/small.txt", sandbox / "small.txt"),
        ("osdf:///ns/missing.dat", sandbox / "missing.dat"),
        ("stash:///ns/medium.bin", sandbox / "medium.bin"),
    ]
    infile = tmp_path / "in.ad"
    # what the starter writes: new-format ads, with attributes we must ignore
    infile.write_text(
        "\n".join(
            format_ad({"Url": u, "LocalFileName": str(p), "DownloadRetries": 2}) for u, p in urls
        )
    )
    outfile = tmp_path / "out.ad"
    outfile.write_bytes(b" " * 16384)  # pre-allocated: must not be truncated
    before = len(access_log(cache))
    r = stashcp(
        "-infile", str(infile), "-outfile", str(outfile),
        env={"STASHFLOW_CLIENT_CACHES": cache.url},
    )  # fmt: skip
    assert r.code == EXIT_NOT_FOUND, r.stderr
    # the found files came in the libcurl first pass: one whole GET each, no range
    gets = [(e["path"], e.get("range")) for e in access_log(cache)[before:] if e["method"] == "GET"]
    assert ("/ns/small.txt", None) in gets and ("/ns/medium.bin", None) in gets
    assert outfile.stat().st_size == 16384
    ads = parse_ads(outfile.read_text())
    assert len(ads) == 3
    by_url = {get_attr(ad, "TransferUrl"): ad for ad in ads}
    for url, path in urls:
        ad = by_url[url]
        assert ad["TransferFileName"] == str(path)
        assert ad["TransferType"] == "download"
        assert ad["TransferStartTime"] <= ad["TransferEndTime"]
    ok = by_url["stash:///ns/small.txt"]
    assert ok["TransferSuccess"] is True and ok["TransferTotalBytes"] == 16
    assert "TransferError" not in ok
    assert (sandbox / "small.txt").read_bytes() == b"hello stashflow\n"
    big = by_url["stash:///ns/medium.bin"]
    assert big["TransferSuccess"] is True
    assert big["TransferFileBytes"] == (origin_dir / "medium.bin").stat().st_size
    assert (sandbox / "medium.bin").read_bytes() == (origin_dir / "medium.bin").read_bytes()
    bad = by_url["osdf:///ns/missing.dat"]
    assert bad["TransferSuccess"] is False
    assert "osdf:///ns/missing.dat" in bad["TransferError"] and "not found" in bad["TransferError"]
    assert bad["TransferRetryable"] is False
    (err,) = bad["TransferErrorData"]
    assert err["ErrorType"] == "Specification" and err["Retryable"] == -1
    assert err["ErrorCode"] == EXIT_NOT_FOUND and err["FailedServer"] == cache.url
    assert not (sandbox / "missing.dat").exists()
    assert sorted(p.name for p in sandbox.iterdir()) == ["medium.bin", "small.txt"]


def test_all_succeed_old_format_input(cache: CacheProcess, tmp_path: Path) -> None:
    infile = tmp_path / "in.ad"
    infile.write_text(
        f'Url = "stash:///ns/small.txt"\nLocalFileName = "{tmp_path / "a.txt"}"\n\n'
        f'Url = "stash:///ns/empty"\nLocalFileName = "{tmp_path / "e"}"\n'
    )
    outfile = tmp_path / "out.ad"
    r = stashcp("-infile", str(infile), "-outfile", str(outfile),
                env={"STASHFLOW_CLIENT_CACHES": cache.url})  # fmt: skip
    assert r.code == EXIT_OK, r.stderr
    ads = parse_ads(outfile.read_text())
    assert [a["TransferSuccess"] for a in ads] == [True, True]
    assert (tmp_path / "e").read_bytes() == b""


def test_unreachable_caches_are_retryable(tmp_path: Path) -> None:
    infile = tmp_path / "in.ad"
    infile.write_text(format_ad({"Url": "stash:///ns/x", "LocalFileName": str(tmp_path / "x")}))
    outfile = tmp_path / "out.ad"
    r = stashcp(
        "-infile", str(infile), "-outfile", str(outfile),
        env={"STASHFLOW_CLIENT_CACHES": "http://127.0.0.1:1", "STASHFLOW_CLIENT_BACKOFF": "0.05"},
    )  # fmt: skip
    assert r.code == 12
    (ad,) = parse_ads(outfile.read_text())
    assert ad["TransferSuccess"] is False and ad["TransferRetryable"] is True
    assert ad["TransferErrorData"][0]["ErrorType"] == "Contact"
    assert ad["TransferErrorData"][0]["Retryable"] >= 0
