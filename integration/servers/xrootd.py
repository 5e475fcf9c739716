"""Real XRootD servers for tests and benchmarks: an origin (root:// and XrdHttp on one
server) and an XCache (proxy file cache) in front of an origin.

Both run the Debian `xrootd` binary in the foreground as our child process, so stopping
them cannot leave a daemon or a zombie behind, with a configuration written into the
caller's directory and every port chosen free on 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from types import TracebackType

from stashflow.integration.servers import free_port, wait_for_port

XROOTD_USER = "xrootd"
START_TIMEOUT = 30.0
# Another process can take a port between free_port() and the server's bind().
_START_ATTEMPTS = 3
_DONE = re.compile(r"------ xrootd \S+ initialization (completed|failed)")
_PORT_TAKEN = ("Address already in use", "Unable to bind")


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def xrootd_available() -> str | None:
    """None when an XRootD server can be started here, otherwise the reason it cannot."""
    if shutil.which("xrootd") is None:
        return "the `xrootd` binary is not on PATH (Debian package xrootd-server)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(XROOTD_USER)
        except KeyError:
            return (
                f"running as root, and xrootd refuses to run as root without a user "
                f"to switch to: user {XROOTD_USER!r} does not exist"
            )
    return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _check_reachable(path: Path, uid: int) -> None:
    """The server runs as another user: every ancestor of its directory must let that
    user through, or it fails later with an opaque 'permission denied'."""
    for ancestor in path.resolve().parents:
        st = ancestor.stat()
        if st.st_uid == uid or st.st_mode & stat.S_IXOTH:
            continue
        raise ServerStartError(
            f"{path}: user {XROOTD_USER!r} cannot reach it because {ancestor} is mode "
            f"{stat.filemode(st.st_mode)}; use a directory under /tmp made with "
            f"tempfile.mkdtemp() or chmod o+x the ancestors"
        )


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


class _XRootDProcess:
    """Shared lifecycle: write the config, start in the foreground, wait for the log
    to say initialization completed, stop on exit."""

    kind = "xrootd"
    export = ""  # the exported path, set by each subclass

    def __init__(self, workdir: Path | str, *, http: bool) -> None:
        self.workdir = Path(workdir)
        self.http = http
        self.host = "127.0.0.1"
        self.port = 0
        self.http_port = 0
        self.run_dir = self.workdir / "run"
        self.log_path = self.run_dir / f"{self.kind}.log"
        self.config_path = self.workdir / f"{self.kind}.cfg"
        self.pid_path = self.run_dir / f"{self.kind}.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    # Subclasses say what to serve.
    def _config_lines(self) -> list[str]:
        raise NotImplementedError

    def _owned_dirs(self) -> list[Path]:
        return [self.run_dir]

    def _write_config(self) -> None:
        lines = [
            "all.role server",
            f"xrd.port {self.port}",
            # xrootd binds every interface; only loopback clients may talk to it.
            "xrd.allow host localhost",
            "xrd.allow host 127.0.0.1",
            f"all.adminpath {self.run_dir}",
            f"all.pidpath {self.run_dir}",
            *self._config_lines(),
        ]
        if self.http:
            lines.append(f"xrd.protocol XrdHttp:{self.http_port} libXrdHttp.so")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        reason = xrootd_available()
        if reason is not None:
            raise ServerStartError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for directory in self._owned_dirs():
            directory.mkdir(parents=True, exist_ok=True)
        command = ["xrootd", "-c", str(self.config_path), "-l", str(self.log_path)]
        command += ["-s", str(self.pid_path)]
        if os.geteuid() == 0:
            user = pwd.getpwnam(XROOTD_USER)
            _check_reachable(self.workdir, user.pw_uid)
            os.chown(self.workdir, user.pw_uid, user.pw_gid)
            for directory in self._owned_dirs():
                _chown_tree(directory, user.pw_uid, user.pw_gid)
            command += ["-R", XROOTD_USER]
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = free_port()
            self.http_port = free_port() if self.http else 0
            self._write_config()
            self.log_path.unlink(missing_ok=True)
            try:
                self._launch(command)
                return
            except ServerStartError:
                log = _tail(self.log_path)
                if attempt == _START_ATTEMPTS or not any(s in log for s in _PORT_TAKEN):
                    raise

    def _launch(self, command: list[str]) -> None:
        stderr_path = self.workdir / f"{self.kind}.stderr"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self._proc = proc
        deadline = time.monotonic() + START_TIMEOUT
        outcome = None
        while outcome is None:
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                break
            try:
                found = _DONE.search(self.log_path.read_text(errors="replace"))
            except FileNotFoundError:
                found = None
            if found:
                outcome = found.group(1)
            else:
                time.sleep(0.05)
        if outcome == "completed":
            try:
                wait_for_port(self.port, timeout=5)
                if self.http:
                    wait_for_port(self.http_port, timeout=5)
                return
            except TimeoutError as exc:
                outcome = str(exc)
        self.stop()
        why = outcome or (
            f"exited with status {proc.returncode}"
            if proc.returncode is not None
            else f"no 'initialization completed' after {START_TIMEOUT:.0f}s"
        )
        raise ServerStartError(
            f"{self.kind} did not start ({why}); config {self.config_path}\n"
            f"--- log tail ({self.log_path}):\n{_tail(self.log_path)}\n"
            f"--- stderr:\n{_tail(stderr_path, 10)}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    @property
    def root_url(self) -> str:
        return f"root://{self.host}:{self.port}/{self.export}"

    @property
    def http_url(self) -> str:
        if not self.http:
            raise RuntimeError(f"this {self.kind} was started without HTTP")
        return f"http://{self.host}:{self.http_port}{self.export}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> _XRootDProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class XRootDServer(_XRootDProcess):
    """An XRootD origin exporting `export` over root:// and (with http=True) XrdHttp.

    Files live under `exports_dir` (the oss.localroot): the object `/data/x` is the
    file `exports_dir/data/x`, i.e. `data_dir / "x"`. When running as root, the
    server runs as user `xrootd` and `exports_dir` is given to that user, so that
    writes through the server work.
    """

    kind = "xrootd"

    def __init__(
        self,
        workdir: Path | str,
        *,
        exports_dir: Path | str | None = None,
        export: str = "/data",
        http: bool = True,
        checksums: tuple[str, ...] = ("adler32", "crc32c", "md5"),
        extra_config: list[str] | None = None,
    ) -> None:
        super().__init__(workdir, http=http)
        if not export.startswith("/") or export == "/":
            raise ValueError(f"export must be an absolute path below '/', not {export!r}")
        self.export = export.rstrip("/")
        self.exports_dir = Path(exports_dir) if exports_dir else self.workdir / "localroot"
        self.data_dir = self.exports_dir / self.export.lstrip("/")
        self.checksums = checksums
        self.extra_config = list(extra_config or [])

    def _owned_dirs(self) -> list[Path]:
        return [self.run_dir, self.exports_dir, self.data_dir]

    def _config_lines(self) -> list[str]:
        lines = [f"oss.localroot {self.exports_dir}", f"all.export {self.export}"]
        if self.checksums:
            # The first algorithm is the default answer to an unqualified query.
            lines.append(f"xrootd.chksum max 2 {' '.join(self.checksums)}")
        return lines + self.extra_config

    def __enter__(self) -> XRootDServer:
        self.start()
        return self


class XCacheServer(_XRootDProcess):
    """An XCache (XrdPss + XrdPfc) caching `export` from `origin`.

    `origin` is "host:port" of an XRootD server or an http(s):// URL (which needs the
    Debian package xrootd-client-http-plugins).
    """

    kind = "xcache"

    def __init__(
        self,
        workdir: Path | str,
        *,
        origin: str,
        export: str = "/data",
        http: bool = True,
        blocksize: str = "1m",
        ram: str = "1g",
        prefetch: int = 4,
        extra_config: list[str] | None = None,
    ) -> None:
        super().__init__(workdir, http=http)
        self.origin = origin.removeprefix("root://").rstrip("/")
        self.export = export.rstrip("/")
        self.cache_dir = self.workdir / "cache"
        self.blocksize = blocksize
        self.ram = ram
        self.prefetch = prefetch
        self.extra_config = list(extra_config or [])

    def _owned_dirs(self) -> list[Path]:
        return [self.run_dir, self.cache_dir]

    def _config_lines(self) -> list[str]:
        return [
            f"all.export {self.export}",
            f"oss.localroot {self.cache_dir}",
            "ofs.osslib libXrdPss.so",
            "pss.cachelib libXrdPfc.so",
            f"pss.origin {self.origin}",
            # Without these a request for an uncached file with the origin down hangs
            # for more than two minutes.
            "pss.setopt ConnectTimeout 10",
            "pss.setopt RequestTimeout 25",
            "pss.setopt ConnectionRetry 2",
            f"pfc.ram {self.ram}",
            f"pfc.blocksize {self.blocksize}",
            f"pfc.prefetch {self.prefetch}",
            "pfc.diskusage 0.90 0.95 purgeinterval 60",
            # Checksum queries go to the origin; crc32c here makes 5.5.3 fail to start.
            "ofs.ckslib * libXrdPss.so",
            "xrootd.chksum adler32",
            *self.extra_config,
        ]

    def __enter__(self) -> XCacheServer:
        self.start()
        return self
