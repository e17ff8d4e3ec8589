"""Shared fixtures: a real fake upstream and a real Thermostat on loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import Config, build_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

IN_CI = os.environ.get("CI", "").lower() == "true"


def make_config(upstream_url: str, data_dir: Path, **sections: dict) -> Config:
    doc: dict = {
        "server": {"data_dir": str(data_dir), "max_body_bytes": 200_000},
        "upstreams": [{"name": "fake", "base_url": upstream_url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0}],
        "storage": {"flush_interval_s": 0.05},
        # Test servers without a token opt in explicitly, as an operator must (proxy.control.auth.require_token_or_opt_in).
        # A test that passes its own `admin` section replaces this, and then needs a token or to opt in itself.
        "admin": {"allow_unauthenticated": True},
    }
    for key, value in sections.items():
        doc[key] = value
    return build_config(doc, environ={})


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def thermostat(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = make_config(upstream.url, tmp_path_factory.mktemp("data"), optimization={"enabled": False})
    running = start_thermostat(cfg)
    yield running
    running.stop()
