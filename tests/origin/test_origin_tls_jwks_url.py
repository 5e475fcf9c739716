"""An origin over HTTPS whose issuer publishes its keys at a URL (served by a real
HTTP server), through a key rotation: a token signed with a new key id is accepted
once the issuer publishes it, without restarting the origin."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stashflow.integration import tokens
from stashflow.integration.servers import free_port, wait_for_port
from tests.origin.harness import AUDIENCE, ISSUER, OriginProcess, curl, curl_status


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("issuer")
    tokens.keygen(directory, kid="old")
    return directory


@pytest.fixture(scope="module")
def jwks_url(keys_dir: Path) -> Iterator[str]:
    """The issuer's key directory served over HTTP by Python's own http.server."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=keys_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=20)
        yield f"http://127.0.0.1:{port}/jwks.json"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def origin(
    tmp_path_factory: pytest.TempPathFactory, jwks_url: str
) -> Iterator[tuple[OriginProcess, Path, Path]]:
    base = tmp_path_factory.mktemp("origin-tls")
    data = base / "data"
    data.mkdir()
    (data / "hello.txt").write_bytes(b"hello over tls")
    cert, key = _self_signed(base)
    args = [
        "--export", f"/ns=file://{data}",
        "--issuer", ISSUER, "--jwks", jwks_url, "--audience", AUDIENCE,
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--jwks-min-refresh", "0.1s",
    ]  # fmt: skip
    with OriginProcess(args, base) as process:
        yield process, cert, data


def test_https_with_tokens_and_key_rotation(
    origin: tuple[OriginProcess, Path, Path], keys_dir: Path
) -> None:
    process, cert, _ = origin
    url = f"https://127.0.0.1:{process.port}/ns/hello.txt"
    code, body = curl_status(curl("--cacert", str(cert), url))
    assert code == 401 and b"missing_token" in body

    def get(token: str) -> tuple[int, bytes]:
        return curl_status(curl("--cacert", str(cert), "-H", f"Authorization: Bearer {token}", url))

    old = tokens.issue(keys_dir / "old.pem", ISSUER, ["storage.read:/ns"], audience=AUDIENCE)
    assert get(old) == (200, b"hello over tls")

    # the issuer rotates: a new key, published next to the old one in jwks.json
    tokens.keygen(keys_dir, kid="new")
    time.sleep(0.2)  # past --jwks-min-refresh since the first fetch
    new = tokens.issue(keys_dir / "new.pem", ISSUER, ["storage.read:/ns"], audience=AUDIENCE)
    assert get(new) == (200, b"hello over tls")
    assert get(old) == (200, b"hello over tls")

    # a token with a key id the issuer never published is refused, saying why
    rogue_dir = keys_dir.parent / "rogue"
    tokens.keygen(rogue_dir, kid="never-published")
    rogue = tokens.issue(
        rogue_dir / "never-published.pem", ISSUER, ["storage.read:/ns"], audience=AUDIENCE
    )
    code, body = get(rogue)
    assert code == 401 and b"bad_signature" in body and b"never-published" in body

    # plain HTTP to the TLS port gets nothing useful
    assert curl_status(curl(f"http://127.0.0.1:{process.port}/ns/hello.txt"))[0] != 200
