"""`GET /api/optimization/events`: the stored event log, newest first, paged and bounded, admin only."""

from __future__ import annotations

from tests.control.conftest import api, assert_error_shape
from tests.support.servers import RunningThermostat


def test_events_are_paged_newest_first_with_their_scope(own_ctl: RunningThermostat) -> None:
    t = own_ctl
    # The scenario's own events, older than this test's: none, or an SLO breach when a loaded machine slowed its requests.
    earlier = [e["reason"] for e in api(t, "GET", "/events", params={"limit": 500}).json()["items"]]
    for i in range(3):
        for action in ("rollback", "resume"):
            assert api(t, "POST", f"/{action}", json={"reason": f"{action} {i}"}).status_code == 200
    t.flush()
    first = api(t, "GET", "/events", params={"limit": 4}).json()
    assert first["limit"] == 4 and first["offset"] == 0 and first["next_offset"] == 4 and first["since"] is None
    assert [e["reason"] for e in first["items"]] == ["resume 2", "rollback 2", "resume 1", "rollback 1"]
    assert all(e["scope"] == "global" and e["task_type"] is None for e in first["items"])
    assert first["items"][1]["to_phase"] == "rollback" and first["items"][0]["from_phase"] == "rollback"
    second = api(t, "GET", "/events", params={"limit": 4, "offset": first["next_offset"]}).json()
    assert [e["reason"] for e in second["items"]] == ["resume 0", "rollback 0", *earlier[:2]]
    assert second["next_offset"] == (None if len(earlier) <= 2 else 8)
    assert len({e["id"] for e in first["items"] + second["items"]}) == 6 + len(earlier[:2])
    assert api(t, "GET", "/events", params={"window_s": 3600}).json()["since"] is not None


def test_events_are_bounded_and_need_the_token(ctl: RunningThermostat) -> None:
    assert_error_shape(api(ctl, "GET", "/events", headers={}), 401)
    for params in ({"limit": 0}, {"limit": 501}, {"offset": 10_001}, {"offset": -1}, {"window_s": 0}):
        assert_error_shape(api(ctl, "GET", "/events", params=params), 400)


def test_a_monitor_event_is_scoped_to_its_task_type() -> None:
    from proxy.control.views import stored_event_out
    from proxy.store import EventRecord

    change = stored_event_out(EventRecord(at=5.0, kind="change_detected", from_phase="general", reason="holdout quality fell",
                                          evidence={"holdout_samples": 31, "task_type": "code"}, actor="conservative"))
    assert (change.scope, change.task_type, change.to_phase, change.evidence["holdout_samples"]) == ("task", "code", None, 31)
    promote = stored_event_out(EventRecord(at=6.0, kind="promote", from_phase="canary", to_phase="guarded", reason="criteria met",
                                           evidence={"samples": 600}))
    assert (promote.scope, promote.task_type, promote.actor) == ("global", None, None)
