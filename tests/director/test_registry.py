"""Cache registration and heartbeats, expiry, static caches and their health probes,
against a real director process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from stashflow.integration.servers import free_port
from tests.director.helpers import DirectorProcess

INTERVAL = 0.5
ORIGIN = "http://origin.example:8000/ns"


def _first(d: DirectorProcess, path: str = "/ns/obj") -> list[str]:
    resp = d.get(path)
    assert resp.status == 307, resp.body
    return [u for u, _ in resp.links()]


def test_registration_answers_the_namespace_map(tmp_path: Path) -> None:
    with DirectorProcess(
        tmp_path,
        args=[
            "--namespace",
            f"/ns={ORIGIN}",
            "--namespace",
            "/prot=s3://bucket/prot",
            "--protected",
            "/prot=https://issuer.example",
            "--heartbeat-interval",
            "7s",
        ],
    ) as d:
        resp = d.register("c1", "http://127.0.0.1:1/", site="nowhere", load=0.25)
        assert resp.status == 200
        body = resp.json()
        assert body["name"] == "c1" and body["state"] == "up"
        assert body["heartbeat_interval"] == 7.0 and body["expires_after"] == 14.0
        assert body["namespaces"] == {
            "/ns": {
                "origins": [ORIGIN],
                "require_token": False,
                "issuer": None,
                "collections_url": "http://origin.example:8000",
                "token_base_path": "/",
            },
            "/prot": {
                "origins": ["s3://bucket/prot"],
                "require_token": True,
                "issuer": "https://issuer.example",
                "collections_url": None,
                # an s3:// origin declares nothing: token scopes are absolute
                "token_base_path": "/",
            },
        }
        assert any("not in the site map" in w for w in body["warnings"])
        cache = d.caches()["c1"]
        assert cache["url"] == "http://127.0.0.1:1"  # trailing slash dropped
        assert cache["load"] == 0.25 and cache["site"] == "nowhere"

        # malformed registrations are refused with a JSON reason
        for bad in (
            {"url": "http://x:1"},
            {"name": "x", "url": "ftp://x"},
            {"name": "x", "url": "http://x:1", "load": 2},
            {"name": "x", "url": "http://x:1", "free_bytes": -1},
            [1, 2],
        ):
            r = d.post("/api/v1.0/director/registerCache", bad)
            assert r.status == 400, bad
            assert r.json()["status"] == 400 and "registerCache refused" in r.json()["error"]
        r = d.get(
            "/api/v1.0/director/registerCache",
            method="POST",
            data=b"{nope",
            headers={"Content-Type": "application/json"},
        )
        assert r.status == 400 and "not JSON" in r.json()["error"]
        assert d.get("/api/v1.0/director/registerCache").status == 405


def test_heartbeat_expiry_and_return(tmp_path: Path) -> None:
    with DirectorProcess(
        tmp_path,
        args=[
            "--namespace",
            f"/ns={ORIGIN}",
            "--heartbeat-interval",
            f"{INTERVAL}s",
        ],
    ) as d:
        assert d.register("steady", "http://steady.example:8000").status == 200
        assert d.register("flaky", "http://flaky.example:8000").status == 200
        # while both heartbeat (more often than the interval), both stay candidates
        deadline = time.monotonic() + 4 * INTERVAL
        while time.monotonic() < deadline:
            d.register("steady", "http://steady.example:8000")
            d.register("flaky", "http://flaky.example:8000")
            assert len(_first(d)) == 2
            time.sleep(INTERVAL / 3)
        # flaky stops heartbeating: it is gone within 2 heartbeat periods
        stopped = time.monotonic()
        gone_at = None
        while time.monotonic() - stopped < 4 * INTERVAL:
            d.register("steady", "http://steady.example:8000")
            hosts = _first(d)
            if not any("flaky" in u for u in hosts):
                gone_at = time.monotonic() - stopped
                break
            time.sleep(0.05)
        assert gone_at is not None, "flaky never left the candidate list"
        assert gone_at <= 2 * INTERVAL + 0.2
        assert gone_at >= INTERVAL  # not expired before it missed a heartbeat
        time.sleep(0.3)  # let housekeeping notice the transition
        caches = d.caches()
        assert caches["flaky"]["state"] == "expired"
        assert caches["steady"]["state"] == "up"
        assert d.metrics()['stashflow_director_cache_expirations_total{cache="flaky"}'] == 1
        # a heartbeat brings it back
        d.register("flaky", "http://flaky.example:8000")
        assert len(_first(d)) == 2
        # and unregisterCache removes it at once
        r = d.post("/api/v1.0/director/unregisterCache", {"name": "flaky"})
        assert r.status == 200
        assert [u for u in _first(d) if "flaky" in u] == []
        assert d.post("/api/v1.0/director/unregisterCache", {"name": "flaky"}).status == 404


def test_load_and_namespace_filters(tmp_path: Path) -> None:
    with DirectorProcess(
        tmp_path,
        args=[
            "--namespace",
            f"/ns={ORIGIN}",
            "--namespace",
            "/other=http://o.example/other",
            "--heartbeat-interval",
            "60s",
            "--max-load",
            "0.8",
        ],
    ) as d:
        d.register("busy", "http://busy.example:8000", load=0.85)
        d.register("idle", "http://idle.example:8000", load=0.1, namespaces=["/ns"])
        for i in range(20):  # the busy cache is never first while the idle one is up
            assert "idle" in _first(d, f"/ns/obj{i}")[0]
        assert d.caches()["busy"]["state"] == "full"
        # the idle cache does not serve /other: only the busy one is offered
        assert [u.split("/")[2] for u in _first(d, "/other/x")] == ["busy.example:8000"]


def test_registration_token(tmp_path: Path) -> None:
    with DirectorProcess(
        tmp_path,
        args=[
            "--namespace",
            f"/ns={ORIGIN}",
            "--registration-token",
            "s3cret",
        ],
    ) as d:
        body = {"name": "c", "url": "http://c.example:1"}
        r = d.post("/api/v1.0/director/registerCache", body)
        assert r.status == 401
        r = d.post(
            "/api/v1.0/director/registerCache", body, headers={"Authorization": "Bearer wrong"}
        )
        assert r.status == 403
        r = d.post(
            "/api/v1.0/director/registerCache", body, headers={"Authorization": "Bearer s3cret"}
        )
        assert r.status == 200


def test_static_cache_that_is_down(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with DirectorProcess(
        tmp_path,
        args=[
            "--namespace",
            f"/ns={ORIGIN}",
            "--namespace",
            "/posix=file:///srv/data",
            "--cache",
            f"{dead}@somewhere",
            "--heartbeat-interval",
            "1s",
        ],
    ) as d:
        deadline = time.monotonic() + 10
        while d.caches()[dead]["state"] != "down":
            assert time.monotonic() < deadline, d.caches()
            time.sleep(0.1)
        cache = d.caches()[dead]
        assert cache["static"] is True and cache["site"] == "somewhere"
        assert cache["health"] == "failing" and "health probe failed" in cache["health_reason"]
        # no live cache: clients are sent to the http origin, and told so
        resp = d.get("/ns/f.txt")
        assert resp.status == 307
        assert resp.headers["location"] == f"{ORIGIN}/f.txt"
        assert resp.headers["x-stashflow-fallback"] == "origin"
        # no live cache and no http origin: 503 with the reason
        resp = d.get("/posix/f.txt")
        assert resp.status == 503
        assert "no cache is alive for /posix" in resp.json()["error"]
        assert resp.headers["x-pelican-namespace"] == "namespace=/posix, require-token=false"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no namespace"),
        (["--namespace", "/ns"], "use /NS=ORIGIN_URL"),
        (["--namespace", "/=http://o"], "namespace '/' is not allowed"),
        (["--namespace", "/ns=http://o", "--protected", "/ns"], "needs an issuer"),
        (["--namespace", "/ns=http://o", "--protected", "/x=https://i"], "is not a --namespace"),
        (["--namespace", "/ns=http://o", "--cache", "ftp://c@s"], "must be http"),
        (["--namespace", "/ns=http://o", "--site-map", "/nonexistent.toml"], "does not exist"),
        (["--namespace", "/ns=http://o", "--tls-cert", "/no.pem"], "go together"),
        (
            ["--namespace", "/ns=http://o", "--tls-cert", "/no.pem", "--tls-key", "/no.key"],
            "does not exist",
        ),
        (["--namespace", "/ns=http://o", "--trusted-proxy", "nonsense"], "not an address"),
        (["--namespace", "/ns=http://o", "--listen", "nowhere"], "HOST:PORT"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stashflow.integration.cli",
            "director",
            "serve",
            "--listen",
            "127.0.0.1:0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_site_map_errors(tmp_path: Path) -> None:
    bad = tmp_path / "sites.toml"
    bad.write_text('[sites.a]\nnetworks = ["10.0.0.0/33"]\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stashflow.integration.cli",
            "director",
            "serve",
            "--namespace",
            "/ns=http://o",
            "--site-map",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "sites.a.networks has '10.0.0.0/33', which is not a CIDR" in proc.stderr


def test_open_unregister_only_from_the_registering_host(tmp_path: Path) -> None:
    """Without a registration token, another host cannot take a cache out: only the
    address it registered from may unregister it (127.0.0.2 and 127.0.0.1 are two
    loopback hosts here)."""
    with DirectorProcess(tmp_path, args=["--namespace", f"/ns={ORIGIN}"]) as d:
        body = {"name": "c", "url": "http://c.example:1"}
        assert d.post("/api/v1.0/director/registerCache", body, source="127.0.0.2").status == 200
        r = d.post("/api/v1.0/director/unregisterCache", {"name": "c"}, source="127.0.0.1")
        assert r.status == 403, r.body
        assert "127.0.0.2" in r.json()["error"] and "--registration-token" in r.json()["error"]
        assert "c" in d.caches()
        r = d.post("/api/v1.0/director/unregisterCache", {"name": "c"}, source="127.0.0.2")
        assert r.status == 200, r.body
        assert "c" not in d.caches()
    # with a token, the token is the authority, whichever host sends it
    with DirectorProcess(
        tmp_path / "t", args=["--namespace", f"/ns={ORIGIN}", "--registration-token", "s3cret"]
    ) as d:
        auth = {"Authorization": "Bearer s3cret"}
        body = {"name": "c", "url": "http://c.example:1"}
        r = d.post("/api/v1.0/director/registerCache", body, headers=auth, source="127.0.0.2")
        assert r.status == 200
        r = d.post("/api/v1.0/director/unregisterCache", {"name": "c"}, headers=auth)
        assert r.status == 200, r.body


@pytest.mark.parametrize(
    ("listen", "token", "warned"),
    [("0.0.0.0", None, True), ("0.0.0.0", "s3cret", False), ("127.0.0.1", None, False)],
)
def test_open_registration_on_a_network_address_is_warned(
    tmp_path: Path, listen: str, token: str | None, warned: bool
) -> None:
    port = free_port()
    args = ["--namespace", f"/ns={ORIGIN}", "--listen", f"{listen}:{port}"]
    if token:
        args += ["--registration-token", token]
    d = DirectorProcess(tmp_path, args=args, port=port).start()
    try:
        assert d.get("/api/v1.0/director/health").status == 200
    finally:
        d.stop()
    text = d.log.read_text()
    assert ("registration is OPEN" in text) is warned, text
