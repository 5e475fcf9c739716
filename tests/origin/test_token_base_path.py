"""An issuer's base path: given to a real origin with --issuer-base-path, enforced on
token scopes there, declared at /.well-known/stashflow-origin, and advertised by a real
director in X-Pelican-Token-Generation, so that a Pelican client minting scopes relative
to the advertised base path gets tokens the origin accepts."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.director.helpers import DirectorProcess
from tests.origin.harness import AUDIENCE, Issuer, OriginProcess


@dataclass
class Fed:
    based: OriginProcess  # /exp trusts ISSUER with base path /exp
    plain: OriginProcess  # /abs trusts ISSUER with the default base path "/"
    issuer: Issuer
    director: DirectorProcess


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    base = tmp_path_factory.mktemp("base-path")
    issuer = Issuer(base / "issuer")
    for name in ("exp", "abs"):
        (base / name / "sub").mkdir(parents=True)
        (base / name / "sub" / "f.txt").write_bytes(b"in " + name.encode() + b"\n")
        (base / name / "g.txt").write_bytes(b"g\n")
    common = ["--jwks", str(issuer.jwks), "--audience", AUDIENCE, "--access-log", "off"]
    based = OriginProcess(
        ["--export", f"/exp=file://{base / 'exp'}", "--issuer", issuer.issuer,
         *common, "--issuer-base-path", "/exp/"],
        base / "logs",
    )  # fmt: skip
    plain = OriginProcess(
        ["--export", f"/abs=file://{base / 'abs'}", "--issuer", issuer.issuer, *common],
        base / "logs",
    )
    with based, plain:
        director = DirectorProcess(
            base / "director",
            args=[
                "--namespace", f"/exp={based.url}/exp",
                "--namespace", f"/abs={plain.url}/abs",
                "--namespace", "/gone=http://127.0.0.1:9/gone",
                "--protected", "/exp", "--protected", "/abs", "--protected", "/gone",
                "--issuer", issuer.issuer,
                "--heartbeat-interval", "1s",
            ],
        )  # fmt: skip
        with director:
            yield Fed(based, plain, issuer, director)


def test_scopes_relative_to_the_configured_base_path(fed: Fed) -> None:
    relative = fed.issuer.token("storage.read:/sub")
    resp = fed.based.call("GET", "/exp/sub/f.txt", token=relative)
    assert resp.status == 200, resp.body
    assert resp.body == b"in exp\n"
    # the scope covers /exp/sub only, not the rest of the export
    assert fed.based.call("GET", "/exp/g.txt", token=relative).status == 403
    # an absolute-looking scope is relative too: /exp/sub means /exp/exp/sub
    absolute = fed.issuer.token("storage.read:/exp/sub")
    refused = fed.based.call("GET", "/exp/sub/f.txt", token=absolute)
    assert refused.status == 403
    assert "/exp/exp/sub" in refused.body.decode()
    # the default base path keeps scopes absolute (the behaviour before the option)
    plain_token = fed.issuer.token("storage.read:/abs/sub")
    assert fed.plain.call("GET", "/abs/sub/f.txt", token=plain_token).status == 200
    assert fed.plain.call("GET", "/abs/sub/f.txt", token=relative).status == 403


def test_origin_declares_its_issuers(fed: Fed) -> None:
    doc = fed.based.call("GET", "/.well-known/stashflow-origin").json()
    assert doc == {
        "exports": [{"prefix": "/exp", "public": False}],
        "issuers": [{"issuer": fed.issuer.issuer, "base_path": "/exp"}],
    }
    doc = fed.plain.call("GET", "/.well-known/stashflow-origin").json()
    assert doc["issuers"] == [{"issuer": fed.issuer.issuer, "base_path": "/"}]


def _generation(director: DirectorProcess, path: str) -> dict[str, str]:
    resp = director.get(path)
    assert resp.status == 307, resp.body
    fields = resp.headers["x-pelican-token-generation"].split(", ")
    return dict(f.split("=", 1) for f in fields)


def test_director_advertises_the_declared_base_path(fed: Fed) -> None:
    # The director asks the origins in the background; wait for its first answers.
    deadline = time.monotonic() + 30
    while _generation(fed.director, "/exp/sub/f.txt")["base-path"] != "/exp":
        assert time.monotonic() < deadline, fed.director.log.read_text()[-2000:]
        time.sleep(0.2)
    gen = _generation(fed.director, "/exp/sub/f.txt")
    assert gen["issuer"] == fed.issuer.issuer
    # an origin that declares no base path, and one that cannot be asked: "/"
    assert _generation(fed.director, "/abs/sub/f.txt")["base-path"] == "/"
    assert _generation(fed.director, "/gone/x")["base-path"] == "/"
    spaces = {
        n["prefix"]: n
        for n in fed.director.get("/api/v1.0/director/namespaces").json()["namespaces"]
    }
    assert spaces["/exp"]["token_base_path"] == "/exp"
    assert spaces["/abs"]["token_base_path"] == "/"

    # What a Pelican client does with the answer: scope = object path minus base path.
    obj = "/exp/sub/f.txt"
    minted = fed.issuer.token("storage.read:" + obj[len(gen["base-path"]) :])
    redirect = fed.director.get("/api/v1.0/director/origin" + obj)
    assert redirect.status == 307
    location = redirect.headers["location"]
    assert location == fed.based.url + obj
    assert fed.based.call("GET", obj, token=minted).status == 200


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--issuer-base-path", "relative"], "must be absolute"),
        (["--issuer-base-path", "/a/../b"], "must be absolute"),
        (["--issuer-base-path", "/a", "--issuer-base-path", "/b"], "one --issuer-base-path"),
    ],
)
def test_bad_base_path_is_refused(tmp_path: Path, extra: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stashflow.integration.cli", "origin", "serve",
         "--export", f"/ns=file://{tmp_path}", "--issuer", "https://i", *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()[-1]) < 300


def test_caches_take_the_base_path_from_the_director_or_their_own_flags(
    fed: Fed, tmp_path: Path
) -> None:
    from tests.cache.harness import CacheProcess

    # the cache's own token for the origin: relative to /exp too, it covers all of it
    own = tmp_path / "cache.token"
    own.write_text(fed.issuer.token("storage.read:/"))
    relative = {"Authorization": "Bearer " + fed.issuer.token("storage.read:/sub")}
    absolute = {"Authorization": "Bearer " + fed.issuer.token("storage.read:/exp/sub")}
    common = ["--audience", AUDIENCE, "--origin-token-file", str(own),
              "--issuer", f"{fed.issuer.issuer}={fed.issuer.jwks}"]  # keys, not the base
    # a cache that learns its namespaces (and the base path) from the director
    with CacheProcess(tmp_path / "c1", {}, extra=["--director", fed.director.url, *common]) as c:
        deadline = time.monotonic() + 30
        while (r := c.get("/exp/sub/f.txt", relative)).status != 200:
            assert time.monotonic() < deadline, (r.status, r.body[:300])
            time.sleep(0.3)
        assert r.body == b"in exp\n"
        # relative to /exp, "/exp/sub" names /exp/exp/sub: not this object
        assert c.get("/exp/sub/f.txt", absolute).status == 403
    # a cache configured by hand says the same with --issuer-base-path
    flags = ["--protected", "/exp", "--issuer-base-path", "/exp", *common]
    with CacheProcess(tmp_path / "c2", {"/exp": f"{fed.based.url}/exp"}, extra=flags) as c:
        assert c.get("/exp/sub/f.txt", relative).body == b"in exp\n"
        assert c.get("/exp/g.txt", relative).status == 403  # /exp/g.txt is not under /sub
