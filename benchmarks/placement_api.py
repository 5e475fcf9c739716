"""Placement API benchmark: our server against the real Rucio server, same client calls.

Both servers run on the same PostgreSQL (each on its own fresh database) with the same
number of worker processes, and are driven by the same rucio.client.Client (rucio-clients
41.x from our virtualenv):

    add_replicas          10,000 files, 1,000 per call
    attach_dids           the same files to one dataset, 1,000 per call
    list_replicas         the dataset, sort=random, every line consumed
    add_replication_rule  on the 10,000-file dataset, to an RSE that holds nothing

The anchor is Rucio 41.5.1, installed into a separate virtualenv by this script (never a
dependency of ours), bootstrapped with its own tools and served by gunicorn. Results are
printed as files per second and as ratios ours/Rucio, and written to a marked section of
docs/benchmarks.md.

    .venv/bin/python benchmarks/placement_api.py [--files 10000] [--workers 2]
        [--rounds 5] [--warmup-files 2000] [--rucio-venv DIR] [--skip-rucio]
        [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_common import update_markdown

from stashflow.integration.servers.service import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUCIO_VERSION = "41.5.1"
USERNAME, PASSWORD = "ddmlab", "secret"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SECTION = "## Placement API: stashflow vs Rucio " + RUCIO_VERSION
OPERATIONS = ("add_replicas", "attach_dids", "list_replicas", "add_replication_rule")
DOMAINS = {"wan": {"read": 1, "write": 1, "delete": 1, "third_party_copy_read": 1,
                   "third_party_copy_write": 1},
           "lan": {"read": 1, "write": 1, "delete": 1}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path,
                   timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server did not listen on {port} within {timeout} s")


@contextlib.contextmanager
def database(prefix: str) -> Iterator[str]:
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def checkpoint() -> None:
    """Write the dirty buffers of the previous round out now, so that the checkpoint its
    writes call for does not land in the middle of the next round (of either server)."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


@contextlib.contextmanager
def running(command: list[str], port: int, log: Path,
            env: dict[str, str] | None = None) -> Iterator[None]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_listening(port, process, log)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- the two servers ---------------------------------------------------------------------


@contextlib.contextmanager
def ours(workers: int, work: Path) -> Iterator[str]:
    with database("bench_stashflow") as name:
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        stashflow = str(BIN / "stashflow")
        subprocess.run([stashflow, "placement", "db", "upgrade", "--db", url], check=True,
                       capture_output=True)
        subprocess.run([stashflow, "placement", "bootstrap", "--db", url, "--root-password",
                        PASSWORD, "--root-username", USERNAME], check=True,
                       capture_output=True)
        with ServiceProcess("placement", ["--db", url, "--workers", str(workers),
                                          "--log-level", "WARNING"], work,
                            log_level=None) as service:
            yield service.url


def rucio_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    marker = path / f".rucio-{RUCIO_VERSION}"
    if not marker.exists():
        print(f"installing rucio=={RUCIO_VERSION} and gunicorn into {path} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        f"rucio[postgresql]=={RUCIO_VERSION}", "gunicorn"], check=True)
        marker.touch()
    return python


@contextlib.contextmanager
def rucio(workers: int, work: Path, venv: Path) -> Iterator[str]:
    python = rucio_venv(venv)
    with database("bench_rucio") as name:
        home = work / "rucio-server"
        (home / "etc").mkdir(parents=True, exist_ok=True)
        (home / "log").mkdir(exist_ok=True)
        db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        migrations = subprocess.run(
            [str(python), "-c", "import os, rucio.db.sqla as m; "
                                "print(os.path.join(os.path.dirname(m.__file__), 'migrate_repo'))"],
            check=True, capture_output=True, text=True).stdout.strip()
        alembic_ini = home / "etc" / "alembic.ini"
        # Rucio's migration env.py also configures logging from this file.
        alembic_ini.write_text(
            f"[alembic]\nsqlalchemy.url = {db_url}\nscript_location = {migrations}\n"
            "[loggers]\nkeys = root\n[handlers]\nkeys = console\n"
            "[formatters]\nkeys = generic\n"
            "[logger_root]\nlevel = WARN\nhandlers = console\n"
            "[handler_console]\nclass = StreamHandler\nargs = (sys.stderr,)\n"
            "formatter = generic\n[formatter_generic]\nformat = %%(message)s\n")
        config = home / "etc" / "rucio.cfg"
        config.write_text(
            "[common]\n"
            f"logdir = {home / 'log'}\nloglevel = WARNING\n"
            f"[alembic]\ncfg = {alembic_ini}\n"
            "[database]\n"
            f"default = {db_url}\n"
            "pool_size = 10\nmax_overflow = 10\n"
            "[bootstrap]\n"
            f"userpass_identity = {USERNAME}\nuserpass_pwd = {PASSWORD}\n"
            "userpass_email = bench@example.org\n"
            "[policy]\n"
            "permission = generic\nschema = generic\nlfn2pfn_algorithm_default = hash\n"
            "[api]\nendpoints = accounts, auth, dids, ping, replicas, rses, rules, scopes\n")
        env = {**os.environ, "RUCIO_CONFIG": str(config), "RUCIO_HOME": str(home)}
        setup = subprocess.run([str(python), "-c",
                                "from rucio.db.sqla.util import build_database, "
                                "create_base_vo, create_root_account\n"
                                "build_database(); create_base_vo(); create_root_account()"],
                               env=env, capture_output=True, text=True)
        if setup.returncode != 0:
            raise RuntimeError(f"bootstrapping Rucio failed:\n{setup.stderr[-3000:]}")
        port = free_port()
        gunicorn = str(python.parent / "gunicorn")
        with running([gunicorn, "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
                      "--timeout", "600", "--log-level", "warning",
                      "rucio.web.rest.flaskapi.v1.main:application"], port,
                     work / "rucio.log", env=env):
            yield f"http://127.0.0.1:{port}"


# --- the workload ----------------------------------------------------------------------


def client_for(url: str, work: Path, label: str) -> Any:
    from rucio.client import Client
    from rucio.common.config import clean_cached_config

    config = work / f"client-{label}.cfg"
    config.write_text(f"[client]\nrucio_host = {url}\nauth_host = {url}\n"
                      f"auth_type = userpass\nusername = {USERNAME}\npassword = {PASSWORD}\n"
                      f"account = root\nrequest_retries = 3\n"
                      f"auth_token_file_path = {work}/token-{label}\n")
    os.environ["RUCIO_CONFIG"] = str(config)
    clean_cached_config()
    return Client(rucio_host=url, auth_host=url, account="root", auth_type="userpass",
                  creds={"username": USERNAME, "password": PASSWORD}, timeout=3600)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prepare(url: str, work: Path, label: str) -> Any:
    """A client of the server at `url`, with the scope, RSEs and quotas of the workload."""
    client = client_for(url, work, label)
    client.add_scope("root", "bench")
    for rse in ("BENCH_A", "BENCH_B"):
        client.add_rse(rse)
        client.add_protocol(rse, {"scheme": "file", "hostname": "localhost", "port": 0,
                                  "prefix": f"/data/{rse}",
                                  "impl": "rucio.rse.protocols.posix.Default",
                                  "domains": DOMAINS})
        client.set_local_account_limit("root", rse, -1)
    return client


def _round(client: Any, label: str, count: int, batch: int, tag: str) -> dict[str, float]:
    files = [{"scope": "bench", "name": f"{tag}_file_{i:06d}", "bytes": 1000 + i,
              "adler32": f"{i:08x}"} for i in range(count)]
    chunks = [files[i:i + batch] for i in range(0, count, batch)]
    dataset = f"dataset_{tag}"
    client.add_dataset("bench", dataset)
    seconds = {}
    seconds["add_replicas"] = timed(lambda: [client.add_replicas("BENCH_A", c)
                                             for c in chunks])
    refs = [[{"scope": f["scope"], "name": f["name"]} for f in c] for c in chunks]
    seconds["attach_dids"] = timed(lambda: [client.attach_dids("bench", dataset, c)
                                            for c in refs])
    listed: list[Any] = []
    seconds["list_replicas"] = timed(lambda: listed.extend(client.list_replicas(
        [{"scope": "bench", "name": dataset}], sort="random")))
    if len(listed) != count:
        raise RuntimeError(f"{label}: list_replicas returned {len(listed)} of {count} files")
    seconds["add_replication_rule"] = timed(lambda: client.add_replication_rule(
        [{"scope": "bench", "name": dataset}], 1, "BENCH_B"))
    return seconds


@dataclass
class Result:
    ours: dict[str, list[float]]
    rucio: dict[str, list[float]] | None


def _shown(rates: list[float]) -> str:
    if len(rates) == 1:
        return f"{rates[0]:,.0f}"
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


def report(result: Result, count: int, batch: int, workers: int, rounds: int,
           warmup: int) -> str:
    lines = [
        f"{count:,} files ({batch:,} per call where the call takes a list), "
        f"{workers} server workers each, one PostgreSQL, the same rucio.client.Client, "
        f"client and servers on one machine: {_cpu_model()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. "
        f"{rounds} rounds per server, taken in turns while both run, each on new files, a "
        f"new dataset and a new rule, after a CHECKPOINT and an untimed round of "
        f"{warmup:,} files; "
        f"the figures are the median round (slowest-fastest in brackets), the ratio is "
        f"of the medians.",
        "",
        "Command: `.venv/bin/python " + " ".join(["benchmarks/placement_api.py", *sys.argv[1:]])
        + "` (it builds Rucio's virtualenv on first use).",
        "",
        "| operation | stashflow files/s | Rucio files/s | ratio |",
        "|---|---:|---:|---:|",
    ]
    ratios: dict[str, float] = {}
    for op in OPERATIONS:
        mine = statistics.median(result.ours[op])
        theirs = statistics.median(result.rucio[op]) if result.rucio else None
        if theirs:
            ratios[op] = mine / theirs
        ratio = f"{ratios[op]:.1f}x" if op in ratios else "n/a"
        shown = _shown(result.rucio[op]) if result.rucio else "not run"
        lines.append(f"| {op} | {_shown(result.ours[op])} | {shown} | {ratio} |")
    lines.append("")
    if result.rucio:
        missed = [op for op, ratio in ratios.items() if ratio < 10]
        verdict = "met on every operation" if not missed else "not met for " + ", ".join(missed)
        lines.append(f"Target: at least 10x on each operation: {verdict} in this run.")
    else:
        lines.append("Target: at least 10x on each operation (Rucio not run: no ratios).")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per server; the median round is reported")
    parser.add_argument("--warmup-files", type=int, default=2_000,
                        help="files of the untimed first round of each server")
    parser.add_argument("--rucio-venv", type=Path,
                        default=Path(tempfile.gettempdir()) / f"stashflow-rucio-{RUCIO_VERSION}")
    parser.add_argument("--skip-rucio", action="store_true",
                        help="measure our server only (no anchor, no ratios)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="placement-bench-"))
    mine: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    theirs: dict[str, list[float]] | None = None
    try:
        with contextlib.ExitStack() as stack:
            # Both servers run at once and take turns round by round, so that a drift of
            # the machine's speed during the run (shared vCPUs) weighs on both alike.
            clients = {"stashflow": prepare(stack.enter_context(ours(args.workers, work)),
                                            work, "stashflow")}
            if not args.skip_rucio:
                theirs = {op: [] for op in OPERATIONS}
                clients["rucio"] = prepare(stack.enter_context(
                    rucio(args.workers, work, args.rucio_venv)), work, "rucio")
            # An untimed round first: connections opened, statements compiled and the
            # database's caches filled, as in a server that has been up for a while.
            for label, client in clients.items():
                checkpoint()
                _round(client, label, args.warmup_files, args.batch, "warmup")
            for round_ in range(args.rounds):
                for label, client in clients.items():
                    rates = mine if label == "stashflow" else theirs
                    assert rates is not None
                    checkpoint()
                    seconds = _round(client, label, args.files, args.batch, f"r{round_}")
                    for op in OPERATIONS:
                        rates[op].append(args.files / seconds[op])
                    print(f"{label} round {round_ + 1}/{args.rounds}: " + ", ".join(
                        f"{op} {args.files / seconds[op]:,.0f}/s" for op in OPERATIONS),
                        flush=True)
    except Exception:
        print(f"benchmark failed; logs are in {work}", file=sys.stderr)
        raise
    text = report(Result(mine, theirs), args.files, args.batch, args.workers, args.rounds,
                  args.warmup_files)
    print(f"{SECTION}\n\n{text}")
    update_markdown(args.output, SECTION, text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
