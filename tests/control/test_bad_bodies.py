"""Bad request bodies get 400 (malformed) or 422 (invalid values) in the OpenAI error shape, never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.control.conftest import API, AUTH, assert_error_shape
from tests.support.servers import RunningThermostat

BAD = [
    ("/recommend", b"not json", 400),
    ("/recommend", b"[1, 2]", 400),
    ("/recommend", b'{"task_type": 5}', 400),
    ("/recommend", b'{"task_type": ""}', 400),
    ("/recommend", b'{"context": {"max_tokens": 0}}', 400),
    ("/recommend", b'{"context": {"temperature": "hot"}}', 400),
    ("/recommend", b'{"context": {"model": "x"}, "extra": 1}', 400),
    ("/recommend", b'{"context": {"model": "echo-1", "stream": 0}}', 400),  # strict JSON types, as the schema says
    ("/recommend", b'{"context": {"model": "echo-1", "max_tokens": "300"}}', 400),
    ("/record-outcome", b'{"request_id": "a", "outcome": {"quality": "0.5"}}', 400),
    ("/record-outcome", b'{"request_id": "a", "outcome": {"quality": 0.5}, "overwrite": "true"}', 400),
    ("/test-shadow", b'{"context": {"max_tokens": -5}}', 400),
    ("/test-shadow", b"{", 400),
    ("/record-outcome", b"{}", 400),
    ("/record-outcome", b'{"request_id": "a"}', 400),
    ("/record-outcome", b'{"request_id": "a", "outcome": {}}', 400),
    ("/record-outcome", b'{"request_id": "a", "outcome": {"quality": "good"}}', 400),
    ("/record-outcome", b'{"request_id": "a", "outcome": {"quality": -0.1}}', 400),
    ("/record-outcome", b'{"request_id": "", "outcome": {"quality": 0.5}}', 400),
    ("/record-outcome", b'{"request_id": "a", "outcome": {"quality": 0.5}, "overwrite": "yes"}', 400),
    ("/rollback", b'{"reason": 7}', 400),
    ("/resume", b"nope", 400),
    ("/waivers", b"{}", 400),
    ("/waivers", b'{"task_type": "x", "extra_tokens": 0, "reason": "r", "approver": "a", "duration_s": 5}', 400),
    ("/waivers", b'{"task_type": "x", "extra_tokens": 10, "reason": "r", "approver": "a", "duration_s": 5, "expires_at": 9e18}', 422),
]


@pytest.mark.parametrize(("path", "raw", "status"), BAD)
def test_bad_body(ctl: RunningThermostat, path: str, raw: bytes, status: int) -> None:
    r = httpx.post(f"{ctl.base}{API}{path}", content=raw, headers={**AUTH, "content-type": "application/json"}, timeout=10)
    err = assert_error_shape(r, status)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("query", ["window_s=0", "window_s=abc", "max_rows=0", "bins=100000", "limit=-1", "since=nan"])
def test_bad_query(ctl: RunningThermostat, query: str) -> None:
    path = "/logs" if query.startswith(("limit", "since")) else "/convergence"
    assert_error_shape(httpx.get(f"{ctl.base}{API}{path}?{query}", headers=AUTH, timeout=10), 400)


def test_unknown_route_and_method(ctl: RunningThermostat) -> None:
    assert_error_shape(httpx.get(f"{ctl.base}{API}/nope", headers=AUTH), 404)
    assert_error_shape(httpx.put(f"{ctl.base}{API}/status", headers=AUTH), 405)
