"""`stashflow federation up`: the one-command local federation."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from stashflow.cache.client.errors import EXIT_OK
from tests.cache.harness import ROOT
from tests.client.conftest import stashcp


def test_federation_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stashflow.integration.cli", "federation", "up",
         "--dir", str(tmp_path / "fed"), "--caches", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("try:"):
                break
        text = "".join(lines)
        director = re.search(r"director\s+(\S+)", text)
        assert director, text
        assert len(re.findall(r"^cache\s+http", text, re.M)) == 2
        data = tmp_path / "fed" / "origin" / "public" / "hello.txt"
        data.write_text("hello federation\n")
        r = stashcp("--director", director.group(1), "stash:///public/hello.txt",
                    str(tmp_path / "got.txt"))
        assert r.code == EXIT_OK, r.stderr
        assert (tmp_path / "got.txt").read_text() == "hello federation\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
