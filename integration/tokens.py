"""WLCG token profile JWTs: verification for caches and origins, and a small issuer.

A token is accepted when, in this order (the first failure is the one reported):

1. it is a well-formed JWS compact serialisation signed with an asymmetric algorithm
   (RS256/384/512, PS256/384/512, ES256/384/512; never `none` or HMAC, whose "key" would
   be the public JWKS anyone can read);
2. its `iss` is one of the configured issuers;
3. its signature verifies with a key of that issuer's JWKS (a file, or a URL fetched
   with a TTL and refetched, rate-limited, when a token names an unknown `kid`: that is
   how issuers rotate keys);
4. `exp` is in the future, `nbf` and `iat` are not (with a small clock-skew leeway);
5. `aud` names an audience this service accepts, or the WLCG "any" audience;
6. `wlcg.ver` is a 1.x version.

Authorisation then checks the `scope` claim: `storage.read:/p`, `storage.create:/p`,
`storage.modify:/p` grant that action on `/p` and everything below it, on path-segment
boundaries (`/ns` covers `/ns/a` but not `/nsx`). As the profile defines, `storage.modify`
includes creating, and `storage.create` never allows overwriting or deleting.

Each failure is its own exception class carrying the HTTP status (401: no valid token,
403: a valid token whose scopes do not cover the request, 503: the issuer's keys cannot
be fetched) and a message saying which check failed. Messages and logs never contain the
token itself: a bearer token in a log file is a credential anyone with the log can use.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

log = logging.getLogger("stashflow.tokens")

ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
WLCG_VERSION = "1.0"
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
ACTIONS = ("read", "create", "modify")
# A token is a few KiB at most; refusing huge headers early bounds the work an
# unauthenticated client can make us do.
MAX_TOKEN_LENGTH = 16 * 1024


# -- errors --------------------------------------------------------------------------------


class TokenError(Exception):
    """A token was refused. `status` is the HTTP status to answer with, `reason` a
    short machine-readable name of the failed check, the message says it in words."""

    status = 401
    reason = "invalid_token"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MissingToken(TokenError):
    reason = "missing_token"


class MalformedToken(TokenError):
    reason = "malformed"


class ExpiredToken(TokenError):
    reason = "expired"


class NotYetValid(TokenError):
    reason = "not_yet_valid"


class WrongAudience(TokenError):
    reason = "wrong_audience"


class WrongIssuer(TokenError):
    reason = "wrong_issuer"


class BadSignature(TokenError):
    reason = "bad_signature"


class IssuerUnavailable(TokenError):
    """The issuer's keys could not be loaded: not the client's fault, so 503."""

    status = 503
    reason = "issuer_unavailable"


class ScopeDenied(TokenError):
    """A valid token whose scopes do not cover the request."""

    status = 403
    reason = "insufficient_scope"


# -- scopes --------------------------------------------------------------------------------


def _normalise_scope_path(path: str) -> str | None:
    """'/ns/' -> '/ns'; None for a path that could be read more than one way."""
    if not path.startswith("/") or "\x00" in path:
        return None
    segments = path.strip("/").split("/") if path.strip("/") else []
    if any(seg in ("", ".", "..") for seg in segments):
        return None
    return "/" + "/".join(segments)


def normalise_base_path(path: str) -> str:
    """An issuer's base path as an operator gives it ('/ns/' -> '/ns'); ValueError for
    one that is relative or has '.', '..' or empty segments, since parse_scopes would
    otherwise silently fall back to '/' and grant more than intended."""
    normal = _normalise_scope_path(path)
    if normal is None:
        raise ValueError(
            f"issuer base path {path!r} must be absolute, without '.', '..' or '//' segments"
        )
    return normal


def covers(scope_path: str, path: str) -> bool:
    """Whether a scope on `scope_path` covers `path`: equal, or a parent on a segment
    boundary. Both are absolute, normalised paths."""
    if scope_path == "/":
        return True
    return path == scope_path or path.startswith(scope_path + "/")


@dataclass(frozen=True)
class Scope:
    action: str  # read | create | modify
    path: str  # absolute, normalised, base path of the issuer applied

    def __str__(self) -> str:
        return f"storage.{self.action}:{self.path}"


def parse_scopes(claim: object, base_path: str = "/") -> list[Scope]:
    """The storage scopes of a `scope` claim (space-separated). Other scopes (openid,
    compute.*, storage.stage, ...) are ignored, and so is a storage scope whose path is
    ambiguous ('..', '//'): it grants nothing rather than something unintended."""
    if not isinstance(claim, str):
        return []
    base = _normalise_scope_path(base_path) or "/"
    out: list[Scope] = []
    for item in claim.split():
        name, sep, path = item.partition(":")
        if not name.startswith("storage."):
            continue
        action = name[len("storage.") :]
        if action not in ACTIONS:
            continue
        # WLCG scopes always carry a path; a bare `storage.read` is read as the whole
        # of the issuer's base path, as SciTokens define for a missing path.
        normal = _normalise_scope_path(path if sep and path else "/")
        if normal is None:
            continue
        full = normal if base == "/" else (base if normal == "/" else base + normal)
        out.append(Scope(action, full))
    return out


# What each request kind needs: any one of these actions. `modify` includes `create`
# (WLCG profile: "storage.modify ... includes ... creating new files").
NEEDS: dict[str, tuple[str, ...]] = {
    "read": ("read",),
    "create": ("create", "modify"),
    "modify": ("modify",),
}


@dataclass(frozen=True)
class Token:
    """A verified token. The raw token is deliberately not kept."""

    issuer: str
    subject: str | None
    audiences: tuple[str, ...]
    expires: float
    scopes: tuple[Scope, ...]
    claims: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def allows(self, need: str, path: str) -> bool:
        """Whether a scope grants `need` ('read', 'create' or 'modify') on `path`."""
        actions = NEEDS[need]
        return any(s.action in actions and covers(s.path, path) for s in self.scopes)

    def require(self, need: str, path: str) -> None:
        if self.allows(need, path):
            return
        wanted = " or ".join(f"storage.{a}" for a in NEEDS[need])
        held = " ".join(str(s) for s in self.scopes) or "no storage scopes"
        raise ScopeDenied(
            f"token scope does not cover {path}: it needs {wanted} on {path} or a parent "
            f"directory; the token has {held}"
        )


# -- key sources ---------------------------------------------------------------------------


@dataclass
class _Key:
    kid: str | None
    alg: str | None  # the JWK's own "alg", when it states one
    key: Any  # a cryptography public key


def _load_jwks(document: object, where: str) -> list[_Key]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise IssuerUnavailable(f"{where} is not a JWKS document (no 'keys' list)")
    keys: list[_Key] = []
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kty = jwk.get("kty")
        key: Any
        try:
            if kty == "RSA":
                key = RSAAlgorithm.from_jwk(jwk)
            elif kty == "EC":
                key = ECAlgorithm.from_jwk(jwk)
            else:
                continue  # oct (symmetric) keys have no place in a public key set
        except (jwt.InvalidKeyError, ValueError, KeyError, TypeError) as e:
            log.warning("skipping an unusable key %r in %s: %s", jwk.get("kid"), where, e)
            continue
        if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            key = key.public_key()  # a JWKS holding private parts: use only the public one
        kid = jwk.get("kid")
        alg = jwk.get("alg")
        keys.append(
            _Key(kid if isinstance(kid, str) else None, alg if isinstance(alg, str) else None, key)
        )
    return keys


class KeySource:
    """Where an issuer's public keys come from."""

    description = ""

    async def keys(self, kid: str | None) -> list[_Key]:
        """The candidate keys for a token naming `kid` (all keys when it names none)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections; a file source has none."""


def _select(keys: list[_Key], kid: str | None) -> list[_Key]:
    return keys if kid is None else [k for k in keys if k.kid == kid]


class FileKeySource(KeySource):
    """A JWKS file, re-read when it changes (so rotating keys on disk needs no restart)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        self._stamp: tuple[int, int] | None = None
        self._keys: list[_Key] = []

    async def keys(self, kid: str | None) -> list[_Key]:
        try:
            st = self.path.stat()
        except OSError as e:
            raise IssuerUnavailable(f"JWKS file {self.path} cannot be read: {e.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                document = json.loads(self.path.read_bytes())
            except (OSError, ValueError) as e:
                raise IssuerUnavailable(f"JWKS file {self.path} is unreadable: {e}") from None
            self._keys = _load_jwks(document, str(self.path))
            self._stamp = stamp
        return _select(self._keys, kid)


class URLKeySource(KeySource):
    """A JWKS fetched over HTTP(S), kept for `ttl` seconds.

    A token naming a `kid` we do not have triggers a refetch (the issuer rotated its
    keys), but at most once per `min_refresh` seconds: otherwise anyone could make us
    hammer the issuer by sending tokens with made-up kids. Concurrent requests share one
    fetch. When a refresh fails, the keys we had stay in use: an issuer outage should not
    turn into an outage of every service that trusts it.

    With `url=None` the JWKS location is discovered from the issuer's metadata
    (`/.well-known/openid-configuration`, then `/.well-known/oauth-authorization-server`).
    """

    def __init__(
        self,
        url: str | None,
        *,
        issuer: str | None = None,
        ttl: float = 600.0,
        min_refresh: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        if url is None and issuer is None:
            raise ValueError("give a JWKS URL or an issuer to discover it from")
        self.url = url
        self.issuer = issuer
        self.description = url or f"the JWKS of {issuer} (discovered)"
        self.ttl = ttl
        self.min_refresh = min_refresh
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._keys: list[_Key] = []
        self._fetched = 0.0  # last successful fetch (monotonic)
        self._attempted = float("-inf")  # last attempt, successful or not
        self._lock: asyncio.Lock | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # for tests and metrics

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def keys(self, kid: str | None) -> list[_Key]:
        now = time.monotonic()
        stale = not self._fetched or now - self._fetched > self.ttl
        unknown = kid is not None and not _select(self._keys, kid)
        if stale or unknown:
            await self._refresh(force=stale)
        return _select(self._keys, kid)

    async def _refresh(self, force: bool) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        started = time.monotonic()
        async with self._lock:
            if self._attempted >= started:
                return  # someone else fetched while we waited: use their answer
            if time.monotonic() - self._attempted < self.min_refresh:
                if self._keys or not force:
                    return  # rate limit: the issuer was asked moments ago
            self._attempted = time.monotonic()
            try:
                self._keys = await self._fetch()
                self._fetched = time.monotonic()
            except IssuerUnavailable:
                if not self._keys:
                    raise
                log.warning("refreshing %s failed; keeping the keys we have", self.description)

    async def _get_json(self, url: str) -> object:
        session = self._get_session()
        try:
            async with session.get(url, headers={"Accept": "application/json"}) as r:
                if r.status != 200:
                    raise IssuerUnavailable(f"{url} answered HTTP {r.status}")
                return json.loads(await r.read())
        except (aiohttp.ClientError, TimeoutError) as e:
            raise IssuerUnavailable(f"{url} cannot be fetched: {type(e).__name__}: {e}") from None
        except ValueError:
            raise IssuerUnavailable(f"{url} did not return JSON") from None

    async def _discover(self) -> str:
        assert self.issuer is not None
        base = self.issuer.rstrip("/")
        errors = []
        for well_known in ("openid-configuration", "oauth-authorization-server"):
            try:
                meta = await self._get_json(f"{base}/.well-known/{well_known}")
            except IssuerUnavailable as e:
                errors.append(e.message)
                continue
            if isinstance(meta, dict) and isinstance(meta.get("jwks_uri"), str):
                return str(meta["jwks_uri"])
            errors.append(f"{base}/.well-known/{well_known} has no jwks_uri")
        raise IssuerUnavailable(f"cannot discover the JWKS of {self.issuer}: {'; '.join(errors)}")

    async def _fetch(self) -> list[_Key]:
        self.fetches += 1
        url = self.url or await self._discover()
        keys = _load_jwks(await self._get_json(url), url)
        log.info("loaded %d keys from %s", len(keys), url)
        return keys


def key_source(
    spec: str | os.PathLike[str] | None,
    *,
    issuer: str | None = None,
    ttl: float = 600.0,
    min_refresh: float = 30.0,
) -> KeySource:
    """A key source from a JWKS file path or an http(s) URL; with no spec, the JWKS
    is discovered from the issuer's metadata."""
    if spec is None:
        return URLKeySource(None, issuer=issuer, ttl=ttl, min_refresh=min_refresh)
    text = os.fspath(spec)
    if urlsplit(text).scheme in ("http", "https"):
        return URLKeySource(text, issuer=issuer, ttl=ttl, min_refresh=min_refresh)
    return FileKeySource(text.removeprefix("file://"))


@dataclass
class Issuer:
    """A trusted issuer: its `iss` value, where its keys are, and the base path its
    scope paths are relative to ("/" when scopes name federation paths directly)."""

    issuer: str
    keys: KeySource
    base_path: str = "/"


# -- verification --------------------------------------------------------------------------


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (ValueError, TypeError):
        raise MalformedToken(f"token {what} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise MalformedToken(f"token {what} is not a JSON object")
    return value


def _key_fits(key: _Key, alg: str) -> bool:
    if key.alg is not None and key.alg != alg:
        return False
    if alg.startswith(("RS", "PS")):
        return isinstance(key.key, rsa.RSAPublicKey)
    if isinstance(key.key, ec.EllipticCurvePublicKey):
        return _CURVE_NAMES.get(key.key.curve.name) == _EC_CURVES[alg]
    return False


def _number(claims: Mapping[str, Any], name: str, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise MalformedToken(f"token has no '{name}' claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedToken(f"token claim '{name}' is not a number")
    return float(value)


def _show(value: object, limit: int = 100) -> str:
    """A claim value for a message: claims are chosen by whoever made the token, so
    they are shown quoted, printable ASCII only and bounded in length."""
    text = value if isinstance(value, str) else repr(value)
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return repr(clean if len(clean) <= limit else clean[:limit] + "...")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class TokenVerifier:
    """Verifies WLCG tokens of a set of trusted issuers.

    >>> verifier = TokenVerifier(
    ...     {"https://issuer.example": "https://issuer.example/jwks"},
    ...     audiences=["https://origin.example:8443"],
    ... )
    >>> token = await verifier.verify(raw)          # raises a TokenError subclass
    >>> token.require("read", "/ns/file")          # raises ScopeDenied (403)
    """

    def __init__(
        self,
        issuers: Mapping[str, str | os.PathLike[str] | KeySource | None] | Iterable[Issuer],
        *,
        audiences: Iterable[str] = (),
        accept_any_audience: bool = True,
        leeway: float = 60.0,
        jwks_ttl: float = 600.0,
        jwks_min_refresh: float = 30.0,
    ) -> None:
        self.issuers: dict[str, Issuer] = {}
        if isinstance(issuers, Mapping):
            for iss, src in issuers.items():
                source = (
                    src
                    if isinstance(src, KeySource)
                    else key_source(src, issuer=iss, ttl=jwks_ttl, min_refresh=jwks_min_refresh)
                )
                self.issuers[iss] = Issuer(iss, source)
        else:
            for entry in issuers:
                self.issuers[entry.issuer] = entry
        self.audiences = {a for a in audiences if a}
        if accept_any_audience:
            self.audiences.add(ANY_AUDIENCE)
        self.leeway = leeway

    async def close(self) -> None:
        for entry in self.issuers.values():
            await entry.keys.close()

    async def verify(self, token: str | None, now: float | None = None,
                     base_path: str | None = None) -> Token:
        """The verified token, or a TokenError saying which check failed. `base_path`
        overrides the issuer's for where its scope paths start (a cache serving several
        namespaces of one issuer, each with its own base path, learned per namespace)."""
        if not token:
            raise MissingToken("no bearer token was sent")
        if len(token) > MAX_TOKEN_LENGTH:
            raise MalformedToken(f"token is longer than {MAX_TOKEN_LENGTH} characters")
        parts = token.strip().split(".")
        if len(parts) != 3 or not all(parts[:2]):
            raise MalformedToken("token is not a JWT (expected three dot-separated parts)")
        header = _b64json(parts[0], "header")
        claims = _b64json(parts[1], "payload")

        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise MalformedToken(
                f"token algorithm {_show(alg)} is not accepted (use one of {', '.join(ALGORITHMS)})"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise MalformedToken("token header 'kid' is not a string")

        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise MalformedToken("token has no 'iss' claim")
        entry = self.issuers.get(iss) or self.issuers.get(iss.rstrip("/"))
        if entry is None:
            trusted = ", ".join(sorted(self.issuers)) or "none configured"
            raise WrongIssuer(f"token issuer {_show(iss)} is not trusted here (trusted: {trusted})")

        await self._check_signature(token.strip(), entry, str(alg), kid)
        return self._check_claims(claims, entry, time.time() if now is None else now,
                                  base_path or entry.base_path)

    async def _check_signature(self, token: str, entry: Issuer, alg: str, kid: str | None) -> None:
        candidates = [k for k in await entry.keys.keys(kid) if _key_fits(k, alg)]
        if not candidates:
            which = f"with kid {_show(kid)}" if kid else "at all"
            raise BadSignature(
                f"token signature cannot be checked: {entry.issuer} has no {alg} key {which} "
                f"in {entry.keys.description}"
            )
        jws = jwt.PyJWS(algorithms=list(ALGORITHMS))
        for candidate in candidates:
            try:
                jws.decode_complete(token, key=candidate.key, algorithms=[alg])
                return
            except jwt.InvalidSignatureError:
                continue
            except jwt.DecodeError as e:
                # Structure problems the quick checks above did not catch.
                raise MalformedToken(f"token is not a valid JWS: {e}") from None
            except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError, ValueError, TypeError):
                continue
        raise BadSignature(f"token signature does not verify with the keys of {entry.issuer}")

    def _check_claims(self, claims: dict[str, Any], entry: Issuer, now: float,
                      base_path: str) -> Token:
        exp = _number(claims, "exp", required=True)
        nbf = _number(claims, "nbf", required=False)
        iat = _number(claims, "iat", required=False)
        assert exp is not None
        if now > exp + self.leeway:
            raise ExpiredToken(f"token expired at {_when(exp)}")
        if nbf is not None and now < nbf - self.leeway:
            raise NotYetValid(f"token is not valid before {_when(nbf)} (nbf)")
        if iat is not None and now < iat - self.leeway:
            raise NotYetValid(f"token was issued in the future, at {_when(iat)} (iat)")

        aud = claims.get("aud")
        if isinstance(aud, str):
            audiences: tuple[str, ...] = (aud,)
        elif isinstance(aud, list):
            audiences = tuple(a for a in aud if isinstance(a, str))
        else:
            audiences = ()
        if not audiences:
            raise WrongAudience("token has no 'aud' claim (WLCG tokens must name an audience)")
        if not self.audiences.intersection(audiences):
            accepted = ", ".join(sorted(self.audiences)) or "none"
            shown = _show(", ".join(audiences))
            raise WrongAudience(
                f"token audience {shown} is not accepted here (accepted: {accepted})"
            )

        version = claims.get("wlcg.ver")
        if not isinstance(version, str) or not version:
            raise MalformedToken("token has no 'wlcg.ver' claim: not a WLCG profile token")
        if version.split(".")[0] != "1":
            raise MalformedToken(f"token wlcg.ver {_show(version)} is not supported (1.x is)")

        sub = claims.get("sub")
        return Token(
            issuer=entry.issuer,
            subject=sub if isinstance(sub, str) else None,
            audiences=audiences,
            expires=exp,
            scopes=tuple(parse_scopes(claims.get("scope"), base_path)),
            claims=claims,
        )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header value (None without one)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


# -- a site-run issuer ---------------------------------------------------------------------

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: PrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK (RFC 7517) of a key, without kid/alg/use."""
    public = key.public_key() if isinstance(key, PrivateKey) else key
    if isinstance(public, rsa.RSAPublicKey):
        return dict(RSAAlgorithm.to_jwk(public, as_dict=True))
    return dict(ECAlgorithm.to_jwk(public, as_dict=True))


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): a stable default key id."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def algorithm_for(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    curve = _CURVE_NAMES.get(key.curve.name)
    for alg, name in _EC_CURVES.items():
        if name == curve:
            return alg
    raise ValueError(f"unsupported elliptic curve {key.curve.name}")


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; use an RSA or EC key")
    return key


@dataclass(frozen=True)
class GeneratedKey:
    kid: str
    alg: str
    private_key: Path
    jwks: Path


def keygen(
    out_dir: str | os.PathLike[str], kid: str | None = None, alg: str = "ES256"
) -> GeneratedKey:
    """Create a signing key: `<kid>.pem` (private, mode 0600) and `jwks.json` in
    `out_dir`. An existing jwks.json keeps its other keys, so that tokens signed with the
    previous key still verify while the new one is rolled out (key rotation)."""
    if alg not in ("ES256", "ES384", "RS256"):
        raise ValueError(f"unsupported algorithm {alg!r}: use ES256, ES384 or RS256")
    key: PrivateKey
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        key = ec.generate_private_key(ec.SECP256R1() if alg == "ES256" else ec.SECP384R1())
    jwk: dict[str, str] = public_jwk(key)
    kid = kid or thumbprint(jwk)
    if not kid or "/" in kid or kid.startswith("."):
        raise ValueError(f"key id {kid!r} cannot name a file: use letters, digits, '-' or '_'")
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / f"{kid}.pem"
    jwks_path = directory / "jwks.json"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: a private key must never be readable, even briefly.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    keys: list[dict[str, Any]] = []
    if jwks_path.exists():
        try:
            existing = json.loads(jwks_path.read_text())
            keys = [k for k in existing.get("keys", []) if k.get("kid") != kid]
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{jwks_path} exists but is not a JWKS document: {e}") from None
    keys.append(jwk)
    temp = jwks_path.with_name(f".{jwks_path.name}.tmp")
    temp.write_text(json.dumps({"keys": keys}, indent=2) + "\n")
    os.replace(temp, jwks_path)  # readers see the old or the new key set, never half
    return GeneratedKey(kid, alg, key_path, jwks_path)


def kid_for(key: PrivateKey, key_path: str | os.PathLike[str] | None = None) -> str:
    """The key id of a private key: the one a jwks.json beside it gives the same
    public key (keygen writes both), else its RFC 7638 thumbprint."""
    jwk = public_jwk(key)
    print_ = thumbprint(jwk)
    if key_path is not None:
        jwks_path = Path(key_path).with_name("jwks.json")
        try:
            document = json.loads(jwks_path.read_text())
            for entry in document.get("keys", []):
                if (
                    isinstance(entry, dict)
                    and entry.get("kty") == jwk["kty"]
                    and thumbprint(entry) == print_
                    and isinstance(entry.get("kid"), str)
                ):
                    return str(entry["kid"])
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    return print_


def issue(
    key: PrivateKey | str | os.PathLike[str],
    issuer: str,
    scopes: Sequence[str],
    *,
    audience: str | Sequence[str] = ANY_AUDIENCE,
    lifetime: float = 3600.0,
    subject: str | None = None,
    kid: str | None = None,
    now: float | None = None,
    not_before: float | None = None,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """A signed WLCG token. `key` is a private key or the path of its PEM file."""
    key_path = None if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    private = load_private_key(key_path) if key_path is not None else key
    assert isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    for scope in scopes:
        if not scope or any(c.isspace() for c in scope):
            raise ValueError(f"scope {scope!r} must be one non-empty word")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "wlcg.ver": WLCG_VERSION,
        "iss": issuer,
        "sub": subject or "stashflow-token-issue",
        "aud": audience if isinstance(audience, str) else list(audience),
        "iat": issued,
        "nbf": int(not_before) if not_before is not None else issued,
        "exp": int(issued + lifetime),
        "jti": str(uuid.uuid4()),
        "scope": " ".join(scopes),
    }
    if extra_claims:
        claims.update(extra_claims)
    headers = {"kid": kid or kid_for(private, key_path), "typ": "JWT"}
    return jwt.encode(claims, private, algorithm=algorithm_for(private), headers=headers)
