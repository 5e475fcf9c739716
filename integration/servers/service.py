"""Our own services (`stashflow cache|origin|director serve`) as child processes on
127.0.0.1: used by `stashflow federation up`, the tests and the benchmarks, so that each
starts, waits for and stops a service the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stashflow.integration.servers import free_port, wait_for_port


class ServiceStartError(RuntimeError):
    """The service exited or did not listen in time; the message ends with its log."""


@dataclass
class ServiceProcess:
    """`stashflow SERVICE serve --listen 127.0.0.1:PORT ARGS...`, its output appended to
    `log_dir/SERVICE-PORT.log`."""

    service: str
    args: list[str]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    # None: the level of the environment (STASHFLOW_LOG_LEVEL), else the service default
    log_level: str | None = "INFO"
    scheme: str = "http"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.service}-{self.port}.log"

    def start(self, timeout: float = 30) -> ServiceProcess:
        self.port = self.port or free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "stashflow.integration.cli", self.service, "serve",
                   "--listen", f"127.0.0.1:{self.port}", *self.args]
        level = {"STASHFLOW_LOG_LEVEL": self.log_level} if self.log_level else {}
        env = {**os.environ, **level, **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise ServiceStartError(f"{self.service} exited with code {code}:\n"
                                        f"{self.tail()}")
            try:
                wait_for_port(self.port, timeout=0.5)
                return self
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServiceStartError(f"{self.service} did not listen on port "
                                            f"{self.port} within {timeout:.0f} s:\n"
                                            f"{self.tail()}") from None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Stop with `sig` (SIGTERM: graceful), then SIGKILL after `timeout` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
