"""Records the killed-writer subprocess of test_journal.py appends (importable from a child interpreter)."""

from __future__ import annotations

from proxy.store.journal import JournalRecord, PendingDecision
from tests.storage.test_recorder import entry


def records() -> list[JournalRecord]:
    return [PendingDecision(entry(1).decision), PendingDecision(entry(2).decision), entry(1)]
