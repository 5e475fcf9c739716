"""Which token audiences a cache accepts for a protected namespace (real cache process)."""

from __future__ import annotations

from pathlib import Path

from stashflow.integration import tokens
from tests.cache.harness import CacheProcess

ISSUER = "https://issuer.cache.test"
FEDERATION = "https://federation.example"


def test_a_cache_accepts_the_audiences_it_is_given(tmp_path: Path) -> None:
    src = tmp_path / "o"
    src.mkdir()
    (src / "data.bin").write_bytes(b"protected bytes")
    keys = tokens.keygen(tmp_path / "issuer", kid="k1")
    jwks = tmp_path / "issuer" / "jwks.json"

    def token(audience: str) -> dict[str, str]:
        value = tokens.issue(keys.private_key, ISSUER, ["storage.read:/prot"],
                             audience=audience)
        return {"Authorization": f"Bearer {value}"}

    base = ["--protected", "/prot", "--issuer", f"{ISSUER}={jwks}"]
    with CacheProcess(tmp_path / "c", {"/prot": f"file://{src}"}, extra=base) as c:
        assert c.get("/prot/data.bin", token(tokens.ANY_AUDIENCE)).status == 200
        assert c.get("/prot/data.bin", token(c.url)).status == 200  # its own URL
        refused = c.get("/prot/data.bin", token(FEDERATION))
        assert refused.status == 401 and refused.json()["reason"] == "wrong_audience"
    with CacheProcess(tmp_path / "d", {"/prot": f"file://{src}"},
                      extra=[*base, "--audience", FEDERATION]) as c:
        r = c.get("/prot/data.bin", token(FEDERATION))
        assert r.status == 200 and r.body == b"protected bytes"
        assert c.get("/prot/data.bin", token("https://elsewhere.example")).status == 401
