"""Configuration: TOML files whose every key can be overridden by STASHFLOW_* variables.

A key `size` in section `[cache]` is overridden by `STASHFLOW_CACHE_SIZE`; nested keys
join with '_' (`[cache.eviction] policy` -> `STASHFLOW_CACHE_EVICTION_POLICY`).
Command-line flags win over both.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def parse_size(value: str | int) -> int:
    """'50GiB' -> bytes. Decimal (GB) and binary (GiB) units; a bare number is bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ConfigError(f"invalid size {value!r}: use e.g. 512MiB, 50GiB or 2TB")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = " kmgtp".index(unit) if unit else 0
    return int(number * ((1024 if binary or not unit else 1000) ** power))


def parse_duration(value: str | float | int) -> float:
    """'90s', '5m', '1h', '250ms' or a number of seconds -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION_RE.match(value)
    if not m:
        raise ConfigError(f"invalid duration {value!r}: use e.g. 30s, 5m or 1h")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[(m.group(2) or "s").lower()]
    return float(m.group(1)) * scale


def load(path: str | os.PathLike[str] | None, section: str) -> dict[str, Any]:
    """The `[section]` table of a TOML file (empty without a file), with env overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        data = dict(doc.get(section, {}))
    return _apply_env(data, f"STASHFLOW_{section.upper()}_")


def _apply_env(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    for key, value in list(data.items()):
        if isinstance(value, dict):
            data[key] = _apply_env(dict(value), f"{prefix}{key.upper()}_")
    for name, raw in os.environ.items():
        if not name.startswith(prefix):
            continue
        key = name[len(prefix) :].lower()
        if not key:
            continue
        if isinstance(data.get(key), dict):
            # a variable naming a whole table replaces it (STASHFLOW_CACHE_ORIGINS over
            # [cache.origins]); the section parses the string as it parses a flag
            data[key] = raw
        else:
            data[key] = _coerce(raw, data.get(key))
    return data


def _coerce(raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            return raw
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            return raw
    if isinstance(current, list):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def default_config_path(name: str) -> Path | None:
    env = os.environ.get("STASHFLOW_CONFIG")
    if env:
        return Path(env)
    candidate = Path(f"/etc/stashflow/{name}.toml")
    return candidate if candidate.exists() else None
