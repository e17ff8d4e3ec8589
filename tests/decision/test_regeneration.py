"""Regeneration marks in memory: within and outside the window, per assignment key, bounded."""

from __future__ import annotations

from policies.signals import Signal
from proxy.decision import MemoryRegenerationBook, regeneration_signal
from proxy.decision.regeneration import assignment_key, fingerprint

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of France?"}]


def test_fingerprint_is_roles_and_contents_only() -> None:
    a = fingerprint(MSGS, "k1")
    assert a == fingerprint([{**m, "name": "x"} for m in MSGS], "k1")
    assert a != fingerprint(MSGS, "k2")
    assert a != fingerprint([MSGS[0], {"role": "user", "content": "capital of Spain?"}], "k1")
    assert a != fingerprint([{"role": "assistant", "content": "be brief"}, MSGS[1]], "k1")
    assert a != fingerprint(MSGS, "k1", salt=b"other deployment")
    assert fingerprint([], "k1") is None
    assert "France" not in (a or "")


async def test_within_window_marks_the_earlier_request() -> None:
    book = MemoryRegenerationBook(window_s=600)
    fp = fingerprint(MSGS, "user-1")
    assert fp is not None
    assert await book.observe(fp, "r1", "qa", now=1000.0) is None
    assert await book.observe(fp, "r2", "qa", now=1300.0) == "r1"
    assert await book.observe(fp, "r3", "qa", now=1500.0) == "r2"  # a retry of the retry marks the retry
    assert book.counts == {"qa": 2}


async def test_outside_window_is_a_new_question() -> None:
    book = MemoryRegenerationBook(window_s=600)
    fp = fingerprint(MSGS, "user-1") or ""
    await book.observe(fp, "r1", "qa", now=1000.0)
    assert await book.observe(fp, "r2", "qa", now=1600.0) is None
    assert book.counts == {}


async def test_other_key_is_not_a_regeneration() -> None:
    book = MemoryRegenerationBook(window_s=600)
    await book.observe(fingerprint(MSGS, "user-1") or "", "r1", "qa", now=1000.0)
    assert await book.observe(fingerprint(MSGS, "user-2") or "", "r2", "qa", now=1001.0) is None
    assert await book.observe(fingerprint(MSGS, "user-1") or "", "r1", "qa", now=1002.0) is None  # same request seen twice


async def test_bounded() -> None:
    book = MemoryRegenerationBook(window_s=600, max_entries=3)
    for i in range(10):
        await book.observe(f"fp{i}", f"r{i}", "qa", now=1000.0)
    assert len(book) == 3
    assert await book.observe("fp0", "again", "qa", now=1001.0) is None  # evicted
    assert await book.observe("fp9", "again", "qa", now=1001.0) == "r9"


async def test_listener_gives_an_implicit_signal_for_the_earlier_request() -> None:
    book = MemoryRegenerationBook(window_s=600)
    key = assignment_key({"x-thermostat-key": "tenant-a"}, {"user": "u1"})
    assert key == "tenant-a" and assignment_key({}, {"user": "u1"}) == "u1" and assignment_key(None, [1]) == ""
    assert await regeneration_signal(book, MSGS, key, "r1", "qa", 0.0, now=10.0) is None
    signal = await regeneration_signal(book, MSGS, key, "r2", "qa", 0.0, now=20.0)
    assert signal == Signal(request_id="r1", quality=0.0, source="implicit", at=20.0, reason="regenerated")
    assert await regeneration_signal(book, [], key, "r3", "qa", 0.0, now=30.0) is None
