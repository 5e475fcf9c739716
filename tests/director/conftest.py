from __future__ import annotations

from pathlib import Path

import pytest

from tests.director.helpers import TLS, make_tls


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    return make_tls(Path(tmp_path_factory.mktemp("director-tls")))
