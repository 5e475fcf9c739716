"""Running real director processes, TLS material for them, and HTTP requests that do
not follow redirects (the director's answer is the redirect)."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stashflow.integration.servers.service import ServiceProcess


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def links(self) -> list[tuple[str, dict[str, str]]]:
        """The Link header as [(url, {param: value})], in header order."""
        out = []
        for item in self.headers.get("link", "").split(", <"):
            url, _, params = item.partition(">")
            fields = {}
            for p in params.split(";"):
                k, sep, v = p.strip().partition("=")
                if sep:
                    fields[k] = v
            out.append((url.lstrip("<"), fields))
        return out


def request(
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    ssl_context: ssl.SSLContext | None = None,
    source: str | None = None,
    timeout: float = 20,
) -> Response:
    """One HTTP request, redirects not followed."""
    u = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    src = (source, 0) if source else None
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(
            u.hostname or "", u.port, timeout=timeout, context=ssl_context, source_address=src
        )
    else:
        conn = http.client.HTTPConnection(
            u.hostname or "", u.port, timeout=timeout, source_address=src
        )
    target = u.path + (f"?{u.query}" if u.query else "")
    try:
        conn.request(method, target or "/", body=data, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def post_json(url: str, payload: Any, **kw: Any) -> Response:
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return request(url, "POST", headers=headers, data=json.dumps(payload).encode(), **kw)


@dataclass
class TLS:
    ca: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def make_tls(directory: Path) -> TLS:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stashflow test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    tls = TLS(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    tls.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls


@dataclass
class DirectorProcess:
    """`stashflow director serve` in a subprocess on 127.0.0.1 and a free port."""

    workdir: Path
    args: list[str] = field(default_factory=list)
    tls: TLS | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    service: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        assert self.service is not None
        return self.service.log

    def start(self) -> DirectorProcess:
        args = list(self.args)
        if self.tls:
            args += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
        self.service = ServiceProcess("director", args, self.workdir, env=self.env,
                                      port=self.port).start()
        self.port = self.service.port
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(timeout=10)

    def __enter__(self) -> DirectorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, path: str, method: str = "GET", **kw: Any) -> Response:
        if self.tls and "ssl_context" not in kw:
            kw["ssl_context"] = self.tls.context()
        return request(self.url + path, method, **kw)

    def post(self, path: str, payload: Any, **kw: Any) -> Response:
        if self.tls and "ssl_context" not in kw:
            kw["ssl_context"] = self.tls.context()
        return post_json(self.url + path, payload, **kw)

    def register(
        self, name: str, url: str, site: str | None = None, load: float = 0.0, **extra: Any
    ) -> Response:
        body: dict[str, Any] = {
            "name": name,
            "url": url,
            "load": load,
            "free_bytes": 10**12,
            **extra,
        }
        if site is not None:
            body["site"] = site
        resp = self.post("/api/v1.0/director/registerCache", body)
        return resp

    def caches(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.get("/api/v1.0/director/caches").json()["caches"]}

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.get("/metrics").body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out
