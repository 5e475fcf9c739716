"""`stashcp` as an HTCondor file-transfer plugin (multi-file protocol, version 2).

- `stashcp -classad` prints the capability ad in the line-oriented ("old") format.
- `stashcp -infile IN -outfile OUT [-upload]` reads ClassAds with `Url` and
  `LocalFileName` from IN, transfers each (download by default, upload with
  `-upload`), and writes one result ad per input ad to OUT, in the "new" format:
  `TransferSuccess`, `TransferError`, `TransferUrl`, `TransferFileName`,
  `TransferTotalBytes`, `TransferFileBytes`, `TransferStartTime`, `TransferEndTime`,
  `TransferType`, `TransferProtocol`, `TransferRetryable`, `DeveloperData` and, on
  failure, `TransferErrorData` (the structured error list). OUT may be pre-allocated
  by HTCondor: it is overwritten in place, never truncated.
- The exit code is 0 when every transfer succeeded, else the stashcp exit code of
  the first failure (HTCondor records it as HoldReasonSubCode).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stashflow.cache.client import bulk
from stashflow.cache.client.discovery import Remote, parse_remote
from stashflow.cache.client.errors import (
    EXIT_OK,
    EXIT_USAGE,
    AuthError,
    LocalError,
    NotFound,
    Stalled,
    StashError,
    UsageError,
)
from stashflow.cache.client.transfer import Client, Options, Result

PLUGIN_VERSION = "0.1.0"
SUPPORTED_METHODS = "stash,osdf,pelican"

CAPABILITY_AD: dict[str, Any] = {
    "MultipleFileSupport": True,
    "PluginVersion": PLUGIN_VERSION,
    "PluginType": "FileTransfer",
    "ProtocolVersion": 2,
    "SupportedMethods": SUPPORTED_METHODS,
}


# -- ClassAd values ---------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    """A ClassAd expression we do not evaluate (kept as its source text)."""

    text: str


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>[+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?))
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*|'(?:[^'\\]|\\.)*')
  | (?P<punct>==|!=|<=|>=|=\?=|=!=|&&|\|\||[\[\]{}();,=<>+\-*/%!?:.&|^~])
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected character {text[pos]!r} at offset {pos}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append((kind, m.group()))
    return out


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "/": "/"}


def _unquote(s: str) -> str:
    body = s[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end of ClassAd")
        if value is not None and tok[1] != value:
            raise ValueError(f"expected {value!r}, found {tok[1]!r}")
        self.i += 1
        return tok

    def record(self) -> dict[str, Any]:
        self.take("[")
        ad: dict[str, Any] = {}
        while True:
            tok = self.peek()
            if tok is None:
                raise ValueError("unterminated ClassAd")
            if tok[1] == "]":
                self.i += 1
                return ad
            if tok[1] == ";":
                self.i += 1
                continue
            kind, name = self.take()
            if kind != "name":
                raise ValueError(f"expected an attribute name, found {name!r}")
            if name.startswith("'"):
                name = _unquote(name)
            self.take("=")
            ad[name] = self.expr(stop=(";", "]"))

    def expr(self, stop: tuple[str, ...]) -> Any:
        start = self.i
        value = self._simple()
        tok = self.peek()
        if value is not _NOT_SIMPLE and (tok is None or tok[1] in stop):
            return value
        # anything else: an expression we keep as text
        self.i = start
        depth = 0
        parts: list[str] = []
        while True:
            tok = self.peek()
            if tok is None:
                break
            if depth == 0 and tok[1] in stop:
                break
            if tok[1] in "[{(":
                depth += 1
            elif tok[1] in "]})":
                depth -= 1
            parts.append(tok[1])
            self.i += 1
        return Expr(" ".join(parts))

    def _simple(self) -> Any:
        tok = self.peek()
        if tok is None:
            return _NOT_SIMPLE
        kind, text = tok
        if kind == "string":
            self.i += 1
            return _unquote(text)
        if kind == "number":
            self.i += 1
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "name":
            low = text.lower()
            if low in ("true", "false"):
                self.i += 1
                return low == "true"
            if low in ("undefined", "error"):
                self.i += 1
                return None
            return _NOT_SIMPLE
        if text == "[":
            return self.record()
        if text == "{":
            self.i += 1
            items: list[Any] = []
            while True:
                nxt = self.peek()
                if nxt is None:
                    raise ValueError("unterminated list")
                if nxt[1] == "}":
                    self.i += 1
                    return items
                if nxt[1] == ",":
                    self.i += 1
                    continue
                items.append(self.expr(stop=(",", "}")))
        return _NOT_SIMPLE


_NOT_SIMPLE = object()


def parse_ads(text: str) -> list[dict[str, Any]]:
    """ClassAds from text in the new (`[ a = 1; ... ]`) or old (`a = 1` lines, ads
    separated by blank lines) format."""
    stripped = text.strip().strip("\x00").strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        p = _Parser(_tokens(stripped))
        ads: list[dict[str, Any]] = []
        while p.peek() is not None:
            if p.peek() == ("punct", ";") or p.peek() == ("punct", ","):
                p.i += 1
                continue
            ads.append(p.record())
        return ads
    ads = []
    current: dict[str, Any] = {}
    for line in stripped.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            if not line and current:
                ads.append(current)
                current = {}
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not a ClassAd attribute: {line!r}")
        p = _Parser(_tokens(value.strip()))
        current[name.strip()] = p.expr(stop=())
    if current:
        ads.append(current)
    return ads


def get_attr(ad: dict[str, Any], name: str) -> Any:
    """Attribute lookup, case-insensitive as ClassAds are."""
    low = name.lower()
    for key, value in ad.items():
        if key.lower() == low:
            return value
    return None


def _format_value(value: Any, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "undefined"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Expr):
        return value.text
    if isinstance(value, dict):
        return format_ad(value, indent + "    ")
    if isinstance(value, list | tuple):
        inner = ", ".join(_format_value(v, indent + "    ") for v in value)
        return "{ " + inner + " }"
    text = str(value)
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def format_ad(ad: dict[str, Any], indent: str = "") -> str:
    """One ClassAd in the new format."""
    inner = indent + "    "
    lines = [f"{inner}{k} = {_format_value(v, inner)};" for k, v in ad.items()]
    return "[\n" + "\n".join(lines) + f"\n{indent}]"


def format_old(ad: dict[str, Any]) -> str:
    """One ClassAd in the line-oriented (old/long) format."""
    return "".join(f"{k} = {_format_value(v, '')}\n" for k, v in ad.items())


def capability_ad() -> str:
    return format_old(CAPABILITY_AD)


# -- result ads -------------------------------------------------------------------------


def _error_data(err: StashError) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ErrorCode": err.exit_code,
        "ErrorString": str(err),
        "Retryable": (int(err.retry_after or 0) if err.retryable else -1),
    }
    server = err.server or ""
    if isinstance(err, NotFound):
        data.update(ErrorType="Specification", FailedServer=server)
    elif isinstance(err, AuthError):
        data.update(
            ErrorType="Authorization",
            FailedServer=server,
            FailureType="Authentication" if err.status == 401 else "Authorization",
            ShouldRefresh=False,
        )
    elif isinstance(err, UsageError):
        data.update(ErrorType="Parameter", PluginVersion=PLUGIN_VERSION, PluginLaunched=True)
    elif isinstance(err, LocalError):
        nospace = "disk full" in err.cause or os.strerror(errno.ENOSPC) in err.cause
        if nospace:
            data.update(ErrorType="Transfer", FailedServer="localhost", FailureType="NoSpace")
        else:
            data.update(ErrorType="Parameter", PluginVersion=PLUGIN_VERSION, PluginLaunched=True)
    elif err.status is None and not isinstance(err, Stalled) and "checksum" not in err.kind:
        data.update(ErrorType="Contact", FailedServer=server)
    else:
        data.update(ErrorType="Transfer", FailedServer=server)
        if isinstance(err, Stalled):
            data["FailureType"] = "TooSlow"
        elif err.status in (408, 504):
            data["FailureType"] = "TimedOut"
    return data


def result_ad(url: str, local: str, result: Result, upload: bool) -> dict[str, Any]:
    scheme = url.partition("://")[0] if "://" in url else "stash"
    ad: dict[str, Any] = {
        "TransferUrl": url,
        "TransferFileName": local,
        "TransferType": "upload" if upload else "download",
        "TransferProtocol": scheme,
        "TransferSuccess": result.ok,
        "TransferTotalBytes": result.transferred,
        "TransferFileBytes": result.size if result.ok else 0,
        "TransferStartTime": int(result.start),
        "TransferEndTime": int(result.end or result.start),
        "ConnectionTimeSeconds": round(max(0.0, (result.end or result.start) - result.start), 6),
        "TransferRetryable": bool(result.error.retryable) if result.error else False,
        "DeveloperData": {
            "PluginVersion": PLUGIN_VERSION,
            "Servers": ",".join(result.servers),
            "Attempts": len(result.attempts) + 1,
            "Checksum": result.checksum or "",
            "ResumedBytes": result.resumed,
        },
    }
    if result.error is not None:
        ad["TransferError"] = str(result.error)
        ad["TransferErrorData"] = [_error_data(result.error)]
    return ad


def write_output(path: str, ads: list[dict[str, Any]]) -> None:
    """Write the result ads over `path` without truncating it (HTCondor pre-allocates
    the output file so that a plug-in on a full disk can still report)."""
    text = "\n".join(format_ad(ad) for ad in ads) + "\n"
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        old = os.fstat(fd).st_size
        if old > len(data):
            data += b" " * (old - len(data) - 1) + b"\n"
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the plugin run ---------------------------------------------------------------------


async def _run(ads: list[dict[str, Any]], upload: bool, options: Options) -> list[dict[str, Any]]:
    jobs: list[tuple[str, str]] = []
    for ad in ads:
        url = get_attr(ad, "Url")
        local = get_attr(ad, "LocalFileName")
        if isinstance(url, str) and isinstance(local, str):
            jobs.append((url, local))
    sem = asyncio.Semaphore(options.parallel_files)
    async with Client(options) as client:
        fetched: dict[int, Result] = {}
        if not upload and len(jobs) > 1 and bulk.usable(options):
            items: list[tuple[int, Remote, Path]] = []
            for i, (url, local) in enumerate(jobs):
                with contextlib.suppress(ValueError):  # reported by `one` below
                    items.append((i, parse_remote(url), Path(local)))
            first = await bulk.first_pass(client, [(r, p) for _, r, p in items])
            fetched = {items[k][0]: result for k, result in first.items()}

        async def one(i: int, url: str, local: str) -> dict[str, Any]:
            if i in fetched:
                return result_ad(url, local, fetched[i], upload)
            async with sem:
                try:
                    remote = parse_remote(url)
                except ValueError as e:
                    res = Result(source=url, dest=local, error=UsageError(url, str(e)))
                    res.end = res.start
                else:
                    if upload:
                        res = await client.upload(Path(local), remote)
                    else:
                        res = await client.download(remote, Path(local))
                return result_ad(url, local, res, upload)

        return list(await asyncio.gather(*(one(i, u, p) for i, (u, p) in enumerate(jobs))))


def run_plugin(infile: str, outfile: str, upload: bool, options: Options) -> int:
    """Perform the transfers of `infile`, write the result ads; the exit code."""
    try:
        with open(infile, encoding="utf-8", errors="replace") as f:
            ads = parse_ads(f.read())
    except (OSError, ValueError) as e:
        raise UsageError(infile, f"cannot read the plugin input: {e}") from None
    results = asyncio.run(_run(ads, upload, options))
    write_output(outfile, results)
    for ad in results:
        if not ad["TransferSuccess"]:
            codes = ad.get("TransferErrorData") or [{}]
            return int(codes[0].get("ErrorCode", EXIT_USAGE))
    return EXIT_OK
