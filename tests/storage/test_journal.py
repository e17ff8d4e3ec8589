"""The crash journal: what a killed process appended is read back, replayed once, then deleted."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.store import FeedbackEntry, Journal, LogEntry, Recorder
from proxy.store.journal import INTERRUPTED, PendingDecision, replay_records
from tests.storage.test_recorder import MemorySink, entry

_KILLED_WRITER = """
import os, signal, sys
from proxy.store.journal import Journal, PendingDecision
from tests.storage.journal_support import records
j = Journal(sys.argv[1], fsync_interval_s=3600)
j.open()
for r in records():
    j.append(r)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_records_appended_before_kill_9_are_read_back(tmp_path: Path) -> None:
    # No fsync ever ran (interval one hour): the page cache alone carried the writes.
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    journal = Journal(tmp_path)
    got = journal.open()
    try:
        assert [type(r).__name__ for r in got] == ["PendingDecision", "PendingDecision", "LogEntry"]
        assert isinstance(got[2], LogEntry) and got[2].decision.request_id == "r1"
    finally:
        journal.close(clean=False)


def test_replay_turns_an_unfinished_decision_into_an_interrupted_outcome() -> None:
    a, b = entry(1), entry(2)
    fb = FeedbackEntry(request_id="r1", quality=0.5, reward=None, payload={}, received_at=1.0)
    out = replay_records([PendingDecision(a.decision), PendingDecision(b.decision), a, fb, a])
    assert out[0].decision.request_id == "r2" and out[0].outcome.status == 0  # type: ignore[union-attr]
    assert out[0].outcome.error_class == INTERRUPTED  # type: ignore[union-attr]
    assert out[1] == a and out[2] == fb and len(out) == 3  # a's decision once, with its real outcome


def test_torn_tail_is_ignored(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append(entry(1))
    journal.append(entry(2))
    segment = next(tmp_path.glob("journal.*.log"))
    journal.close(clean=False)
    with open(segment, "ab") as fh:
        fh.write(b"\x00\x00\x01\x00garbage")  # a frame cut short by the crash
    again = Journal(tmp_path)
    assert [r.decision.request_id for r in again.open() if isinstance(r, LogEntry)] == ["r1", "r2"]
    again.close(clean=True)
    assert len(list(tmp_path.glob("journal.*.log"))) == 1  # not marked replayed: kept for the next start
    last = Journal(tmp_path)
    assert len(last.open()) == 2
    last.replayed()
    last.close(clean=True)
    assert list(tmp_path.glob("journal.*.log")) == []


def test_one_process_per_journal_folder(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    first.open()
    try:
        with pytest.raises(RuntimeError, match="in use by another Thermostat process"):
            Journal(tmp_path).open()
    finally:
        first.close(clean=True)


async def test_recorder_replays_the_journal_once_then_deletes_it(tmp_path: Path) -> None:
    left = Journal(tmp_path)
    left.open()
    for i in range(5):
        left.append(PendingDecision(entry(i).decision))
    for i in range(4):  # r4 never finished
        left.append(entry(i))
    left.close(clean=False)

    sink = MemorySink()
    sink.rows["r0"] = entry(0)  # already written before the crash: not duplicated
    rec = Recorder(sink, flush_interval_s=0.01, journal=Journal(tmp_path))
    await rec.start()
    assert sorted(sink.rows) == ["r0", "r1", "r2", "r3", "r4"]
    r4 = sink.rows["r4"]
    assert isinstance(r4, LogEntry) and r4.outcome.error_class == INTERRUPTED
    assert rec.replayed == 5
    assert len(list(tmp_path.glob("journal.*.log"))) == 1  # only this run's segment
    await rec.stop()
    assert list(tmp_path.glob("journal.*.log")) == []


async def test_written_segments_are_deleted_while_running(tmp_path: Path) -> None:
    sink = MemorySink()
    journal = Journal(tmp_path, segment_bytes=2_000)  # a few entries per segment
    rec = Recorder(sink, flush_interval_s=0.01, batch_size=3, journal=journal)
    await rec.start()
    for i in range(40):
        rec.submit(entry(i))
    await rec.flush()
    assert len(sink.rows) == 40
    # every sealed segment was written through and deleted; the active one remains
    assert len(list(tmp_path.glob("journal.*.log"))) == 1
    assert journal.appended == 40
    await rec.stop()


async def test_unwritten_entries_stay_in_the_journal_at_shutdown(tmp_path: Path) -> None:
    sink = MemorySink(fail_times=1_000)  # the log store never takes anything
    rec = Recorder(sink, flush_interval_s=0.01, journal=Journal(tmp_path))
    await rec.start()
    rec.submit(entry(1))
    await rec.stop()
    again = Journal(tmp_path)
    assert [r.decision.request_id for r in again.open() if isinstance(r, LogEntry)] == ["r1"]
    again.close(clean=False)


async def test_one_loop_iterations_frames_go_out_in_one_write(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    try:
        for i in range(5):
            journal.add(PendingDecision(entry(i).decision))
        assert journal.commits == 0 and journal.appended == 0  # buffered until the iteration ends
        await asyncio.sleep(0)
        assert journal.commits == 1 and journal.appended == 5
        journal.add(entry(9))
        journal.append(entry(10))  # an immediate append writes what was buffered first, in order
        assert journal.appended == 7
    finally:
        journal.close(clean=False)
    again = Journal(tmp_path)
    got = again.open()
    again.close(clean=True)
    assert [type(r).__name__ for r in got] == ["PendingDecision"] * 5 + ["LogEntry", "LogEntry"]
    assert [r.decision.request_id for r in got[5:]] == ["r9", "r10"]  # type: ignore[union-attr]


async def test_a_request_is_journaled_as_its_decision_then_only_its_outcome(tmp_path: Path) -> None:
    """Record once: the decision frame before forwarding, a `Completion` after; replay joins them into the LogEntry."""
    journal = Journal(tmp_path)
    journal.open()
    rec = Recorder(MemorySink(), journal=journal)  # not started: only the journal is looked at
    for i in range(3):
        rec.note_decision(entry(i).decision)
    rec.commit()
    rec.submit(entry(0))
    rec.submit(entry(1))  # r2 never finishes
    rec.commit()
    got = journal._read_segment(next(tmp_path.glob("journal.*.log")))
    assert [type(r).__name__ for r in got] == ["PendingDecision"] * 3 + ["Completion", "Completion"]
    out = replay_records(got)
    assert [r.decision.request_id for r in out] == ["r2", "r0", "r1"]  # type: ignore[union-attr]
    assert out[1] == entry(0) and out[2] == entry(1)
    assert out[0].outcome.error_class == INTERRUPTED  # type: ignore[union-attr]
    journal.close(clean=False)


async def test_an_outcome_after_a_seal_carries_its_decision(tmp_path: Path) -> None:
    """The decision frame went into a segment that may be released before the outcome is written: the whole entry instead."""
    journal = Journal(tmp_path)
    journal.open()
    rec = Recorder(MemorySink(), journal=journal)
    rec.note_decision(entry(1).decision)
    journal.seal(0)
    rec.submit(entry(1))
    rec.commit()
    active = sorted(tmp_path.glob("journal.*.log"))[-1]
    assert [type(r).__name__ for r in journal._read_segment(active)] == ["LogEntry"]
    journal.close(clean=True)
