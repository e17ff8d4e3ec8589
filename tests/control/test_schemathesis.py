"""Schemathesis over the OpenAPI document Litestar serves: no request makes the server answer 500.

Runs against its own Thermostat (it calls the mutating endpoints: rollback, resume, waivers).
Bounded: 6 examples per operation, deterministic generation; about 10 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_config
from tests.control.conftest import drive
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import start_thermostat

ST = shutil.which("st") or str(Path(sys.executable).with_name("st"))
TOKEN_ENV = "THERMOSTAT_SCHEMATHESIS_TOKEN"


def test_schemathesis_finds_no_server_error(upstream: FakeUpstream, tmp_path: Path) -> None:
    if not Path(ST).exists():
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    os.environ[TOKEN_ENV] = "schemathesis-token"
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 3}, admin={"token_env": TOKEN_ENV})
    t = start_thermostat(cfg)
    try:
        drive(t, 10, "code", temperature=0.7, max_tokens=300)
        t.flush()
        cmd = [
            ST, "run", f"{t.base}/schema/openapi.json", "--checks", "not_a_server_error", "--max-examples", "6",
            "--generation-deterministic", "--request-timeout", "20", "-H", "Authorization: Bearer schemathesis-token",
            "--workers", "4", "--include-path-regex", "^/api/optimization/",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
        assert "passed" in out.stdout and "failed" not in out.stdout.split("SUMMARY")[-1]
    finally:
        t.stop()
        os.environ.pop(TOKEN_ENV, None)
