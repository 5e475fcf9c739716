"""Shared pieces of the cache benchmarks: launchers for nginx and our cache, `wrk` and
`curl` runners, the machine description, and the markdown section writer.

Every server is a child process of the benchmark, listening on 127.0.0.1 on a free port,
with its configuration in the benchmark's temporary directory; `Servers` stops all of
them on exit, whatever ended the run (an error, Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from stashflow.integration.servers import free_port, wait_for_port
from stashflow.integration.servers.service import ServiceProcess, ServiceStartError

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GiB = 1 << 30


class BenchmarkError(RuntimeError):
    """Something the benchmark depends on did not behave (a server, a tool)."""


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None
    )
    if path is None:
        raise BenchmarkError(f"`{tool}` is not installed (Debian package {package})")
    return path


def _stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20
) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt, so that `with` blocks unwind
    and stop the servers just as on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- nginx ---------------------------------------------------------------------------


@dataclass
class Nginx:
    """nginx serving `root` from disk: the practical ceiling of a static file server.

    Two server blocks in one nginx (`worker_processes` workers, sendfile on): `port`
    without an access log (the anchor of the hit benchmarks), and `origin_port` with an
    access log of the body bytes sent per request, used as the HTTP origin of the cache,
    so that the bytes the cache really read from it can be counted from nginx's side."""

    workdir: Path
    root: Path
    workers: int = 2
    port: int = 0
    origin_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin_url(self) -> str:
        return f"http://127.0.0.1:{self.origin_port}"

    @property
    def origin_log(self) -> Path:
        return self.workdir / "origin-access.log"

    def start(self) -> Nginx:
        binary = need("nginx", "nginx-light")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("tmp", "logs"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.port = self.port or free_port()
        self.origin_port = self.origin_port or free_port()
        tmp = self.workdir / "tmp"
        conf = self.workdir / "nginx.conf"
        # workers run as root so that they read the benchmark's files whatever their mode;
        # nothing but loopback can reach them
        conf.write_text(
            f"""
user root;
worker_processes {self.workers};
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format bytes '$request_uri $status $body_bytes_sent';
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        access_log off;
    }}
    server {{
        listen 127.0.0.1:{self.origin_port};
        root {self.root};
        access_log {self.origin_log} bytes;
    }}
}}
"""
        )
        log = open(self.workdir / "nginx.stderr", "wb")
        with log:
            self.proc = subprocess.Popen(
                [binary, "-p", str(self.workdir), "-c", str(conf), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.port, timeout=15)
            wait_for_port(self.origin_port, timeout=15)
        except TimeoutError:
            self.stop()
            raise BenchmarkError(
                f"nginx did not start: {(self.workdir / 'nginx.stderr').read_text()[-2000:]}"
            ) from None
        return self

    def origin_bytes(self, path: str) -> int:
        """Body bytes the origin server block sent for `path` so far."""
        total = 0
        try:
            lines = self.origin_log.read_text().splitlines()
        except FileNotFoundError:
            return 0
        for line in lines:
            parts = line.split()
            if len(parts) == 3 and parts[0].split("?")[0] == path:
                total += int(parts[2])
        return total

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGQUIT)  # graceful: lets workers finish
            self.proc = None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- our cache -----------------------------------------------------------------------


@dataclass
class Cache:
    """`stashflow cache serve` as a child process (the supervisor and its workers)."""

    directory: Path
    origins: dict[str, str]
    size: str = "8GiB"
    workers: int = 2
    access_log: Path | None = None
    extra: list[str] = field(default_factory=list)
    port: int = 0
    service: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Cache:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            "--dir", str(self.directory), "--size", self.size, "--workers", str(self.workers),
            # like nginx's `access_log off` in the anchor, unless a log is asked for
            "--access-log", str(self.access_log) if self.access_log else "off",
        ]
        for ns, url in self.origins.items():
            args += ["--origin", f"{ns}={url}"]
        self.service = ServiceProcess("cache", args + self.extra, self.directory.parent,
                                      log_level="WARNING", port=self.port)
        try:
            self.service.start()
        except ServiceStartError as e:
            raise BenchmarkError(str(e)) from None
        self.port = self.service.port
        # the supervisor listens before its workers are ready: wait for an answer
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/.stashflow/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BenchmarkError(
                        f"cache does not answer: {self.service.tail()}"
                    ) from None
                time.sleep(0.1)
        return self

    def metrics(self) -> dict[str, float]:
        """Prometheus samples summed over their labels: {metric name: value}."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def __enter__(self) -> Cache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- clients -------------------------------------------------------------------------


@dataclass
class Download:
    status: int
    size: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds > 0 else 0.0


def curl_args(url: str) -> list[str]:
    return [
        need("curl", "curl"),
        "-s",
        "-o",
        "/dev/null",
        "--noproxy",
        "*",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
        url,
    ]


def parse_curl(out: str) -> Download:
    status, size, seconds = out.split()
    return Download(int(status), int(size), float(seconds))


def curl_get(url: str, timeout: float = 600) -> Download:
    """GET `url` to /dev/null with curl; its status, body size and total time."""
    result = subprocess.run(curl_args(url), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise BenchmarkError(f"curl {url} failed ({result.returncode}): {result.stderr.strip()}")
    return parse_curl(result.stdout)


def curl_many(url: str, clients: int, timeout: float = 600) -> list[Download]:
    """`clients` concurrent curl GETs of `url`."""
    procs = [
        subprocess.Popen(curl_args(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(clients)
    ]
    out: list[Download] = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise BenchmarkError(f"curl {url} failed ({proc.returncode}): {stderr.strip()}")
            out.append(parse_curl(stdout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


WRK_SCRIPT = """
-- GET the paths listed (one a line) in the file given after `--`, round-robin from a
-- random starting point per thread
local paths = {}
local n = 0
local i = 0
function init(args)
    for line in io.lines(args[1]) do
        n = n + 1
        paths[n] = line
    end
    math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
    i = math.random(n)
end
function request()
    i = i % n + 1
    return wrk.format("GET", paths[i])
end
"""


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    errors: int
    non_2xx: int
    latency_avg: str
    transfer_per_s: str
    probe: str | None = None


def run_wrk(
    base_url: str,
    paths_file: Path,
    script: Path,
    *,
    threads: int,
    connections: int,
    duration: float,
    probe: Callable[[], str] | None = None,
) -> WrkResult:
    """Run wrk; `probe` is called once while it runs (its answer goes in the result)."""
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    cmd = [
        need("wrk", "wrk"),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        base_url,
        "--",
        str(paths_file),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    probed = None
    try:
        if probe is not None:
            time.sleep(min(1.0, duration / 2))
            probed = probe()
        text, err = proc.communicate(timeout=duration + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchmarkError(f"wrk failed: {err.strip() or text.strip()}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise BenchmarkError(f"cannot parse wrk output:\n{text}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors = sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    latency = re.search(r"Latency\s+(\S+)", text)
    transfer = re.search(r"Transfer/sec:\s+(\S+)", text)
    return WrkResult(
        float(rps.group(1)),
        int(total.group(1)),
        errors,
        int(non2xx.group(1)) if non2xx else 0,
        latency.group(1) if latency else "?",
        transfer.group(1) if transfer else "?",
        probed,
    )


def connections_per_process(port: int) -> str:
    """How the established connections to 127.0.0.1:`port` are spread over the
    processes that accepted them, e.g. "33+31" (from `ss`)."""
    try:
        out = subprocess.run(
            ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    counts: dict[str, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[pid] = counts.get(pid, 0) + 1
    return "+".join(str(n) for n in sorted(counts.values(), reverse=True)) or "0"


# -- reporting -----------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / (1 << 20):.0f} GiB RAM"
    return (
        f"{os.cpu_count()} CPUs ({cpu}){mem}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def tool_versions() -> str:
    out = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        v = subprocess.run([need("nginx", "nginx-light"), "-v"], capture_output=True, text=True)
        out.append(v.stderr.strip().replace("nginx version: ", ""))
    with contextlib.suppress(OSError, subprocess.SubprocessError, BenchmarkError):
        v = subprocess.run([need("xrootd", "xrootd-server"), "-v"], capture_output=True, text=True)
        out.append("xrootd " + (v.stdout.strip() or v.stderr.strip()).splitlines()[-1])
    with contextlib.suppress(OSError, subprocess.SubprocessError, BenchmarkError):
        v = subprocess.run([need("wrk", "wrk"), "-v"], capture_output=True, text=True)
        first = (v.stdout or v.stderr).splitlines()[0]
        out.append(" ".join(first.split()[:2]))
    with contextlib.suppress(ImportError):
        import aiohttp

        out.append(f"aiohttp {aiohttp.__version__}")
    return ", ".join(out)


def update_markdown(path: Path, section_title: str, body: str) -> None:
    """Write `body` as the section `section_title` of `path`, replacing that section if
    present and keeping every other section."""
    section = f"{section_title}\n\n{body.rstrip()}\n"
    if path.exists():
        text = path.read_text()
    else:
        text = "# Benchmarks\n\nEvery figure lists the command that produced it and the machine.\n"
    pattern = re.compile(rf"^{re.escape(section_title)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    match = pattern.search(text)
    if match:
        rest = text[match.end() :]
        text = text[: match.start()] + section + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
