"""Schemathesis over the OpenAPI document Litestar serves: the API does what the document says.

Every check schemathesis has (server errors, documented status codes, content types,
response schemas and headers, schema-valid bodies accepted and invalid ones rejected,
operations marked with a security requirement refusing requests without it, 405 with
`Allow` for undeclared methods) except `allow_header_conformance`: Litestar's automatic
OPTIONS handler for a path with two handlers (GET and POST /waivers) lists only the
first one's methods. Per-operation exceptions live in tests/control/schemathesis.toml.

Runs against its own Thermostat (it calls the mutating endpoints: rollback, resume,
waivers). Bounded: 6 examples per operation, deterministic generation, one worker
(hypothesis' lambda-source cache is not thread-safe under Python 3.11); about 25 s.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, make_config
from tests.control.conftest import drive
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import start_thermostat

ST = shutil.which("st") or str(Path(sys.executable).with_name("st"))
TOKEN_ENV = "THERMOSTAT_SCHEMATHESIS_TOKEN"
SETTINGS = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_the_api_conforming_to_its_document(upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path(ST).exists():
        if IN_CI:
            pytest.fail("schemathesis is required under CI (pip install -e '.[test]')")
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    monkeypatch.setenv(TOKEN_ENV, "schemathesis-token")
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 3}, admin={"token_env": TOKEN_ENV})
    t = start_thermostat(cfg)
    try:
        drive(t, 10, "code", temperature=0.7, max_tokens=300)
        t.flush()
        cmd = [
            ST, "--config-file", str(SETTINGS), "run", f"{t.base}/schema/openapi.json", "--checks", "all",
            "--exclude-checks", "allow_header_conformance", "--max-examples", "6", "--generation-deterministic",
            "--request-timeout", "20", "-H", "Authorization: Bearer schemathesis-token", "--workers", "1",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        summary = out.stdout.split("SUMMARY")[-1]
        assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
        selected = re.search(r"Selected: (\d+)/(\d+)", summary)
        assert selected and selected[1] == selected[2] and f"Tested: {selected[2]}" in summary, summary  # public routes too
        assert "failed" not in summary and "Failures" not in summary and "Errors" not in summary, summary
    finally:
        t.stop()
