"""WLCG token verification, scopes, key sources and the issuer tools. JWKS URLs are
served by a real aiohttp server on 127.0.0.1 that counts its fetches."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from click.testing import CliRunner

from stashflow.integration import tokens
from stashflow.integration.servers import free_port
from stashflow.integration.tokens import (
    ANY_AUDIENCE,
    BadSignature,
    ExpiredToken,
    IssuerUnavailable,
    MalformedToken,
    MissingToken,
    NotYetValid,
    ScopeDenied,
    TokenError,
    TokenVerifier,
    URLKeySource,
    WrongAudience,
    WrongIssuer,
)
from stashflow.integration.tokens_cli import token_group

ISS = "https://issuer.test"
AUD = "https://service.test"


@pytest.fixture
def keys(tmp_path: Path) -> tokens.GeneratedKey:
    return tokens.keygen(tmp_path / "keys", kid="k1", alg="ES256")


def _verifier(keys: tokens.GeneratedKey, **options: Any) -> TokenVerifier:
    return TokenVerifier({ISS: keys.jwks}, audiences=[AUD], **options)


def _token(keys: tokens.GeneratedKey, *scopes: str, **options: Any) -> str:
    options.setdefault("audience", AUD)
    return tokens.issue(keys.private_key, options.pop("issuer", ISS), scopes, **options)


def _b64(document: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()


# -- verification --------------------------------------------------------------------------


async def test_valid_es256_and_rs256_tokens(tmp_path: Path, keys: tokens.GeneratedKey) -> None:
    rsa = tokens.keygen(tmp_path / "keys", kid="k2", alg="RS256")  # same jwks.json
    verifier = _verifier(keys)
    for key in (keys, rsa):
        token = await verifier.verify(_token(key, "storage.read:/ns", subject="alice"))
        assert token.issuer == ISS and token.subject == "alice"
        assert token.audiences == (AUD,)
        assert [str(s) for s in token.scopes] == ["storage.read:/ns"]
    header = jwt.get_unverified_header(_token(rsa, "storage.read:/"))
    assert header["alg"] == "RS256" and header["kid"] == "k2"


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda k, now: _token(k, now=now - 7200, lifetime=3600), ExpiredToken, "expired at"),
        (
            lambda k, now: _token(k, not_before=now + 600, lifetime=3600),
            NotYetValid,
            "not valid before",
        ),
        (
            lambda k, now: _token(k, now=now + 600, not_before=now),
            NotYetValid,
            "issued in the future",
        ),
        (lambda k, now: _token(k, audience="https://x.test"), WrongAudience, "https://x.test"),
        (lambda k, now: _token(k, audience=[]), WrongAudience, "no 'aud'"),
        (lambda k, now: _token(k, issuer="https://evil.test"), WrongIssuer, "evil.test"),
        (lambda k, now: _token(k, kid="nope"), BadSignature, "kid 'nope'"),
        (lambda k, now: "a.b", MalformedToken, "three dot-separated"),
        (lambda k, now: "!!!.e30.sig", MalformedToken, "base64url"),
        (lambda k, now: _token(k, extra_claims={"wlcg.ver": "2.0"}), MalformedToken, "2.0"),
        (lambda k, now: _token(k, extra_claims={"wlcg.ver": None}), MalformedToken, "wlcg.ver"),
        (lambda k, now: _token(k, extra_claims={"exp": None}), MalformedToken, "'exp'"),
        (lambda k, now: _token(k, extra_claims={"exp": "soon"}), MalformedToken, "not a number"),
        (lambda k, now: "", MissingToken, "no bearer token"),
    ],
)
async def test_each_failure_is_its_own_error(
    keys: tokens.GeneratedKey, make: Any, error: type[TokenError], words: str
) -> None:
    raw = make(keys, time.time())
    with pytest.raises(error) as caught:
        await _verifier(keys).verify(raw)
    assert caught.value.status == 401
    assert words in caught.value.message
    if raw:
        assert raw not in str(caught.value)  # messages never carry the token


async def test_bad_signature_tampered_payload_and_foreign_key(
    tmp_path: Path, keys: tokens.GeneratedKey
) -> None:
    verifier = _verifier(keys)
    good = _token(keys, "storage.read:/ns")
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "storage.modify:/"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(BadSignature, match="does not verify"):
        await verifier.verify(f"{header}.{forged}.{signature}")
    rogue = tokens.keygen(tmp_path / "rogue", kid="k1")
    with pytest.raises(BadSignature):
        await verifier.verify(_token(rogue, "storage.read:/ns"))


async def test_symmetric_and_unsigned_algorithms_are_refused(keys: tokens.GeneratedKey) -> None:
    claims = {"iss": ISS, "aud": AUD, "exp": time.time() + 60, "wlcg.ver": "1.0"}
    # HS256 keyed with the public JWKS (which anyone can read): the classic confusion
    # (built by hand: PyJWT itself refuses to sign with a JWK as an HMAC secret)
    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'k1'})}.{_b64(claims)}"
    mac = hmac.new(keys.jwks.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    hs = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    none = jwt.encode(claims, "", algorithm="none")
    for raw in (hs, none):
        with pytest.raises(MalformedToken, match="algorithm"):
            await _verifier(keys).verify(raw)


async def test_audience_any_and_lists(keys: tokens.GeneratedKey) -> None:
    verifier = _verifier(keys)
    await verifier.verify(_token(keys, audience=ANY_AUDIENCE))
    await verifier.verify(_token(keys, audience=["https://a.test", AUD]))
    strict = _verifier(keys, accept_any_audience=False)
    with pytest.raises(WrongAudience):
        await strict.verify(_token(keys, audience=ANY_AUDIENCE))


async def test_leeway_tolerates_small_clock_skew(keys: tokens.GeneratedKey) -> None:
    now = time.time()
    verifier = _verifier(keys, leeway=30)
    await verifier.verify(_token(keys, now=now - 100, lifetime=80))  # expired 20 s ago
    with pytest.raises(ExpiredToken):
        await verifier.verify(_token(keys, now=now - 100, lifetime=60))  # 40 s ago


# -- scopes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "need", "path", "allowed"),
    [
        ("storage.read:/ns", "read", "/ns", True),
        ("storage.read:/ns", "read", "/ns/a/b", True),
        ("storage.read:/ns/", "read", "/ns/a", True),
        ("storage.read:/ns", "read", "/nsx", False),
        ("storage.read:/ns", "read", "/nsx/a", False),
        ("storage.read:/ns/a", "read", "/ns", False),
        ("storage.read:/", "read", "/anything/at/all", True),
        ("storage.read", "read", "/anything", True),
        ("storage.read:/ns", "create", "/ns/a", False),
        ("storage.create:/ns", "create", "/ns/a", True),
        ("storage.create:/ns", "modify", "/ns/a", False),
        ("storage.create:/ns", "read", "/ns/a", False),
        ("storage.modify:/ns", "create", "/ns/a", True),
        ("storage.modify:/ns", "modify", "/ns/a", True),
        ("storage.modify:/ns", "read", "/ns/a", False),
        ("storage.read:/ns/../etc", "read", "/etc/x", False),
        ("storage.read:/ns//a", "read", "/ns/a", False),
        ("storage.stage:/ns", "read", "/ns/a", False),
        ("openid profile", "read", "/ns", False),
    ],
)
async def test_scope_coverage(
    keys: tokens.GeneratedKey, scope: str, need: str, path: str, allowed: bool
) -> None:
    token = await _verifier(keys).verify(_token(keys, *scope.split()))
    assert token.allows(need, path) is allowed
    if not allowed:
        with pytest.raises(ScopeDenied) as caught:
            token.require(need, path)
        assert caught.value.status == 403
        assert f"does not cover {path}" in caught.value.message


async def test_issuer_base_path_prefixes_scopes(keys: tokens.GeneratedKey) -> None:
    verifier = TokenVerifier(
        [tokens.Issuer(ISS, tokens.FileKeySource(keys.jwks), base_path="/osdf/ns")],
        audiences=[AUD],
    )
    token = await verifier.verify(_token(keys, "storage.read:/data", "storage.create:/"))
    assert token.allows("read", "/osdf/ns/data/x")
    assert not token.allows("read", "/data/x")
    assert token.allows("create", "/osdf/ns/anything")
    assert not token.allows("create", "/osdf/nsx")


# -- key sources ---------------------------------------------------------------------------


@dataclass
class JWKSServer:
    """A real HTTP server publishing a JWKS (and issuer metadata) that can be changed."""

    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    fetches: int = 0
    up: bool = True
    url: str = ""

    def publish(self, *generated: tokens.GeneratedKey) -> None:
        keys = []
        for g in generated:
            keys += json.loads(g.jwks.read_text())["keys"]
        self.document = {"keys": keys}


@pytest.fixture
async def jwks_server() -> AsyncIterator[JWKSServer]:
    server = JWKSServer()

    async def jwks(request: web.Request) -> web.Response:
        if not server.up:
            return web.Response(status=503)
        server.fetches += 1
        return web.json_response(server.document)

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response({"issuer": server.url, "jwks_uri": f"{server.url}/jwks"})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    app.router.add_get("/.well-known/openid-configuration", metadata)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


async def test_url_jwks_rotation_refetches_on_unknown_kid(
    tmp_path: Path, jwks_server: JWKSServer
) -> None:
    old = tokens.keygen(tmp_path / "old", kid="old")
    new = tokens.keygen(tmp_path / "new", kid="new")
    jwks_server.publish(old)
    source = URLKeySource(f"{jwks_server.url}/jwks", ttl=3600, min_refresh=0.2)
    verifier = TokenVerifier([tokens.Issuer(ISS, source)], audiences=[AUD])
    try:
        await verifier.verify(_token(old))
        await verifier.verify(_token(old))
        assert jwks_server.fetches == 1  # cached
        jwks_server.publish(old, new)  # the issuer rotates: new key published
        await asyncio.sleep(0.25)
        await verifier.verify(_token(new))
        assert jwks_server.fetches == 2
        await verifier.verify(_token(old))  # both keys valid during the rollover
        assert jwks_server.fetches == 2
    finally:
        await verifier.close()


async def test_unknown_kids_cannot_make_us_hammer_the_issuer(
    tmp_path: Path, jwks_server: JWKSServer
) -> None:
    known = tokens.keygen(tmp_path / "k", kid="known")
    jwks_server.publish(known)
    source = URLKeySource(f"{jwks_server.url}/jwks", ttl=3600, min_refresh=60)
    verifier = TokenVerifier([tokens.Issuer(ISS, source)], audiences=[AUD])
    try:
        await verifier.verify(_token(known))
        for i in range(30):
            with pytest.raises(BadSignature):
                await verifier.verify(_token(known, kid=f"made-up-{i}"))
        assert jwks_server.fetches == 1  # one initial fetch, then rate-limited
    finally:
        await verifier.close()


async def test_ttl_refresh_and_outage_keeps_old_keys(
    tmp_path: Path, jwks_server: JWKSServer
) -> None:
    key = tokens.keygen(tmp_path / "k", kid="k")
    jwks_server.publish(key)
    source = URLKeySource(f"{jwks_server.url}/jwks", ttl=0.1, min_refresh=0)
    verifier = TokenVerifier([tokens.Issuer(ISS, source)], audiences=[AUD])
    try:
        await verifier.verify(_token(key))
        await asyncio.sleep(0.15)
        await verifier.verify(_token(key))
        assert jwks_server.fetches == 2  # the TTL ran out: refetched
        jwks_server.up = False
        await asyncio.sleep(0.15)
        await verifier.verify(_token(key))  # issuer down: the keys we had still work
    finally:
        await verifier.close()


async def test_unreachable_issuer_is_503_not_401(tmp_path: Path, keys: tokens.GeneratedKey) -> None:
    source = URLKeySource(f"http://127.0.0.1:{free_port()}/jwks", timeout=2)
    verifier = TokenVerifier([tokens.Issuer(ISS, source)], audiences=[AUD])
    try:
        with pytest.raises(IssuerUnavailable) as caught:
            await verifier.verify(_token(keys))
        assert caught.value.status == 503
    finally:
        await verifier.close()
    missing = TokenVerifier({ISS: tmp_path / "missing.json"}, audiences=[AUD])
    with pytest.raises(IssuerUnavailable, match="cannot be read"):
        await missing.verify(_token(keys))


async def test_jwks_discovered_from_issuer_metadata(
    tmp_path: Path, jwks_server: JWKSServer
) -> None:
    key = tokens.keygen(tmp_path / "k", kid="k")
    jwks_server.publish(key)
    verifier = TokenVerifier({jwks_server.url: None}, audiences=[AUD])
    try:
        token = await verifier.verify(_token(key, issuer=jwks_server.url))
        assert token.issuer == jwks_server.url
    finally:
        await verifier.close()


async def test_jwks_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    first = tokens.keygen(tmp_path / "keys", kid="first")
    verifier = TokenVerifier({ISS: first.jwks}, audiences=[AUD])
    await verifier.verify(_token(first))
    second = tokens.keygen(tmp_path / "keys", kid="second")  # appended to the same file
    await verifier.verify(_token(second))


# -- issuer tools --------------------------------------------------------------------------


def test_keygen_files_and_kid(tmp_path: Path) -> None:
    made = tokens.keygen(tmp_path / "k")
    assert stat.S_IMODE(made.private_key.stat().st_mode) == 0o600
    document = json.loads(made.jwks.read_text())
    (jwk,) = document["keys"]
    assert jwk["kid"] == made.kid == tokens.thumbprint(jwk)
    assert jwk["alg"] == "ES256" and jwk["use"] == "sig" and "d" not in jwk
    # issue() finds the kid in the jwks.json beside the key
    header = jwt.get_unverified_header(tokens.issue(made.private_key, ISS, ["storage.read:/"]))
    assert header["kid"] == made.kid
    with pytest.raises(ValueError, match="cannot name a file"):
        tokens.keygen(tmp_path / "k", kid="../evil")


def test_cli_keygen_issue_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(token_group, ["keygen", "--out", str(tmp_path), "--kid", "site1"])
    assert result.exit_code == 0, result.output
    made = json.loads(result.output)
    assert made["kid"] == "site1"
    issue = [
        "issue", "--key", made["private_key"], "--issuer", ISS,
        "--scope", "storage.read:/ns", "--scope", "storage.create:/ns/up",
        "--audience", AUD, "--lifetime", "20m", "--subject", "bob",
    ]  # fmt: skip
    result = runner.invoke(token_group, issue)
    assert result.exit_code == 0, result.output
    raw = result.output.strip()
    claims = jwt.decode(raw, options={"verify_signature": False})
    assert claims["scope"] == "storage.read:/ns storage.create:/ns/up"
    assert claims["sub"] == "bob" and claims["aud"] == AUD and claims["wlcg.ver"] == "1.0"
    assert 1190 <= claims["exp"] - claims["iat"] <= 1200

    verify = ["verify", "--issuer", ISS, "--jwks", made["jwks"], "--audience", AUD]
    result = runner.invoke(token_group, [*verify, "--path", "/ns/a", raw])
    assert result.exit_code == 0 and json.loads(result.output)["subject"] == "bob"
    result = runner.invoke(token_group, [*verify, "--path", "/other", raw])
    assert result.exit_code == 1 and "insufficient_scope" in result.output
    result = runner.invoke(token_group, [*verify[:3], "--jwks", made["jwks"]], input=raw)
    assert result.exit_code == 1 and "wrong_audience" in result.output

    bad = runner.invoke(token_group, [*issue[:-4], "--lifetime", "soon"])
    assert bad.exit_code == 2 and "invalid duration" in bad.output
    bad = runner.invoke(token_group, [*issue[:5], "--key", str(tmp_path / "nope.pem")])
    assert bad.exit_code != 0


def test_token_command_through_the_root_cli(tmp_path: Path) -> None:
    env = {**os.environ}
    run = [sys.executable, "-m", "stashflow.integration.cli", "token"]
    keygen = subprocess.run(
        [*run, "keygen", "--out", str(tmp_path), "--alg", "RS256"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert keygen.returncode == 0, keygen.stderr
    key = json.loads(keygen.stdout)["private_key"]
    issued = subprocess.run(
        [*run, "issue", "--key", key, "--issuer", ISS, "--scope", "storage.read:/"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert issued.returncode == 0 and issued.stdout.count(".") == 2
    broken = subprocess.run(
        [*run, "issue", "--key", str(tmp_path / "jwks.json"), "--issuer", ISS, "--scope", "x"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert broken.returncode == 1
    assert broken.stderr.startswith("stashflow token: ") and broken.stderr.count("\n") == 1
