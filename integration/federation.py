"""`stashflow federation up`: a whole federation on this machine with embedded defaults:
an origin exporting a local directory, a director, and caches that register with it.
For trying stashflow out, demos and development; each part runs as its own process,
exactly as it would on separate machines."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from stashflow.integration.servers.service import ServiceProcess, ServiceStartError


@dataclass
class Federation:
    workdir: Path
    namespace: str = "/public"
    caches: int = 1
    origin_url: str = ""
    director_url: str = ""
    cache_urls: list[str] = field(default_factory=list)
    _services: list[ServiceProcess] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "origin" / self.namespace.strip("/")

    def _start(self, service: str, *args: str) -> str:
        process = ServiceProcess(service, list(args), self.workdir, log_level=None)
        self._services.append(process)
        return process.start().url

    def start(self) -> Federation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.origin_url = self._start(
                "origin", "--export", f"{self.namespace}=file://{self.data_dir}",
                "--public-export", self.namespace)
            self.director_url = self._start(
                "director", "--namespace",
                f"{self.namespace}={self.origin_url}{self.namespace}",
                "--heartbeat-interval", "2s")
            for i in range(self.caches):
                self.cache_urls.append(self._start(
                    "cache", "--dir", str(self.workdir / f"cache{i}"), "--size", "1GiB",
                    "--workers", "2", "--director", self.director_url, "--site", "LOCAL",
                    "--access-log", str(self.workdir / f"cache{i}-access.log")))
        except ServiceStartError:
            self.stop()
            raise
        time.sleep(0.5)  # first heartbeats
        return self

    def stop(self) -> None:
        # caches first, so that they do not log a dead director on their way out
        for process in reversed(self._services):
            process.stop()
        self._services.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[Federation]:
        try:
            yield self.start()
        finally:
            self.stop()


@click.group("federation")
def federation_group() -> None:
    """Run a whole federation locally (origin, director, caches)."""


@federation_group.command("up")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default="stashflow-fed",
              show_default=True, help="Work directory: origin data, caches, logs.")
@click.option("--caches", type=int, default=1, show_default=True, help="Number of caches.")
@click.option("--namespace", default="/public", show_default=True,
              help="Namespace exported by the origin (files go in DIR/origin/<ns>).")
def up(workdir: str, caches: int, namespace: str) -> None:
    """Start an origin, a director and caches on 127.0.0.1 until Ctrl-C.

    Put files under DIR/origin/<namespace>, then fetch them with
    `stashcp --director URL stash:///<namespace>/FILE .`
    """
    fed = Federation(Path(workdir).resolve(), namespace=namespace, caches=caches)
    with fed.running():
        click.echo(f"origin    {fed.origin_url}  (data in {fed.data_dir})")
        click.echo(f"director  {fed.director_url}")
        for url in fed.cache_urls:
            click.echo(f"cache     {url}")
        click.echo(f"try:      stashcp --director {fed.director_url} "
                   f"stash://{namespace}/FILE .   (Ctrl-C stops everything)")
        # wait for Ctrl-C or a TERM, then stop every part cleanly
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        click.echo("stopping ...")
