"""Bearer token discovery (WLCG Bearer Token Discovery, in its order).

1. the token given explicitly (`--token`: the token itself, or a file holding it);
2. `BEARER_TOKEN` (the token itself);
3. `BEARER_TOKEN_FILE` (a file holding it);
4. `$XDG_RUNTIME_DIR/bt_u$UID`;
5. `/tmp/bt_u$UID`;
6. inside an HTCondor job, `$_CONDOR_CREDS/scitokens.use`.

Tokens are secrets: nothing here logs or prints one; `describe()` names only where it
came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it was found, safe to print

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}

    def __repr__(self) -> str:  # never show the secret in tracebacks or logs
        return f"Token(source={self.source!r})"

    __str__ = __repr__


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # a token file holds the token on its first non-comment line
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return None


def find_token(explicit: str | None = None, env: dict[str, str] | None = None) -> Token | None:
    """The bearer token to use, or None when there is none."""
    environ = os.environ if env is None else env
    if explicit:
        p = Path(explicit).expanduser()
        try:
            is_file = p.is_file()
        except (OSError, ValueError):  # a token is not a valid path (too long, ...)
            is_file = False
        if is_file:
            value = _read(p)
            if value:
                return Token(value, f"--token file {p}")
        return Token(explicit.strip(), "--token")
    value = environ.get("BEARER_TOKEN", "").strip()
    if value:
        return Token(value, "BEARER_TOKEN")
    file = environ.get("BEARER_TOKEN_FILE")
    if file:
        found = _read(Path(file))
        if found:
            return Token(found, f"BEARER_TOKEN_FILE ({file})")
    uid = os.getuid()
    runtime = environ.get("XDG_RUNTIME_DIR")
    candidates = [Path(runtime) / f"bt_u{uid}"] if runtime else []
    candidates.append(Path(f"/tmp/bt_u{uid}"))
    creds = environ.get("_CONDOR_CREDS")
    if creds:
        candidates.append(Path(creds) / "scitokens.use")
    for path in candidates:
        found = _read(path)
        if found:
            return Token(found, str(path))
    return None
