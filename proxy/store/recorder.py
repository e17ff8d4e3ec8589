"""Outcome recording off the hot path: a bounded queue drained in batches.

`submit` never blocks and never awaits: when the queue is full the entry is
dropped and counted (a metric and a rate-limited log line), because slowing client
traffic down to protect the log would be the wrong trade. A background task writes
batches of `batch_size` or whatever arrived within `flush_interval_s`; a failing
write is retried with backoff while new entries keep queueing. `stop()` drains
everything that is queued.

With a `Journal` (proxy/store/journal.py), `note_decision` journals a decision before
its request is forwarded and `submit` journals each entry as it is queued, so a killed
process loses nothing it answered: `start()` replays what the previous run left before
the writer starts. A request's two frames are group-committed (`Journal.add`: one
`os.write` per loop iteration for every request of that iteration), and the second one
carries only the outcome (`Completion`), so the decision is encoded once; other records
(feedback, events) are appended at once, since whoever acknowledges them does so right
after `submit` returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from policies.records import Decision
from proxy.store.base import Sink
from proxy.store.base import StoreRecord as Entry
from proxy.store.entries import LogEntry
from proxy.store.journal import Completion, Journal, PendingDecision, delete, replay_records

log = logging.getLogger("thermostat.recorder")


class Recorder:
    def __init__(
        self,
        sink: Sink,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        on_drop: Callable[[], None] | None = None,
        on_written: Callable[[int], None] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.sink = sink
        self.journal = journal
        self.replayed = 0  # records a previous run left in the journal, written at start
        self._queued = 0  # entries put on the queue since start (the journal's sealing mark)
        self._done = 0  # of those, written (the queue is FIFO, so always a prefix)
        self.queue: asyncio.Queue[Entry] = asyncio.Queue(maxsize=queue_size)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.dropped = 0
        self.written = 0
        self.write_failures = 0
        self._on_drop = on_drop
        self._on_written = on_written
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_drop_log = 0.0
        self._batch: list[Entry] = []  # taken off the queue by the writer task, not yet written
        self._full = asyncio.Event()  # batch_size entries are queued: the writer stops waiting for more
        self._filling = False  # the writer is waiting for a batch to fill
        # Requests whose decision was journaled and whose entry is still to come -> the segment it went into.
        self._inflight: dict[str, int] = {}
        self.max_inflight = 100_000
        self._writing = False
        self._write_lock = asyncio.Lock()  # one write at a time, in queue order (`flush`)
        self._gave_up = False
        self.ready = False
        # The error of the last write when it failed, None once a write succeeds: readiness reports it
        # (a full disk under SQLite, a spool that cannot be written), the entries wait in queue and journal.
        self.last_error: str | None = None

    async def start(self) -> None:
        await self.sink.open()
        if self.journal is not None:
            await self._replay_journal(self.journal)
        self._task = asyncio.create_task(self._run(), name="thermostat-recorder")
        self.ready = True

    async def _replay_journal(self, journal: Journal) -> None:
        """Write what a killed predecessor left in the journal (idempotent on request id), then delete it."""
        records = replay_records(await asyncio.to_thread(journal.open))
        try:
            for i in range(0, len(records), self.batch_size):
                await self.sink.write(records[i : i + self.batch_size])
        except Exception:
            # Kept for the next start; serving must not wait for the log store.
            log.exception("replaying %d journaled record(s) into %s failed; kept for the next start", len(records), self.sink.name)
            return
        self.replayed = len(records)
        if records:
            log.warning("replayed %d journaled record(s) into %s", len(records), self.sink.name)
        await asyncio.to_thread(journal.replayed)

    def note_decision(self, decision: Decision) -> None:
        """Journal a decision before its request is forwarded (the outcome follows through `submit`)."""
        journal = self.journal
        if journal is not None:
            journal.add(PendingDecision(decision))
            inflight = self._inflight
            inflight[decision.request_id] = journal.segment
            if len(inflight) > self.max_inflight:  # a request that never finished (its entry was never submitted)
                del inflight[next(iter(inflight))]

    def commit(self) -> None:
        """Write what this loop iteration journaled now (the edge calls it before relaying an answer)."""
        if self.journal is not None:
            self.journal.commit()

    def submit(self, entry: Entry) -> bool:
        try:
            self.queue.put_nowait(entry)
            journal = self.journal
            if journal is not None:
                if isinstance(entry, LogEntry):
                    if self._inflight.pop(entry.decision.request_id, None) == journal.segment:
                        journal.add(Completion(entry.decision.request_id, entry.outcome, entry.context_features, entry.prompt))
                    else:  # no decision frame in the active segment (sealed since, or never noted): the whole entry
                        journal.add(entry)
                else:
                    journal.append(entry)
                self._queued += 1
            if self._filling and self.queue.qsize() + len(self._batch) >= self.batch_size:
                self._full.set()
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            now = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.warning("outcome queue full (%d): dropped %d entries so far", self.queue.maxsize, self.dropped)
            return False

    async def _next_batch(self) -> list[Entry]:
        """Collect up to batch_size entries or what arrives within flush_interval_s.

        One timed wait per batch (woken early by `submit` once batch_size are queued), not
        one per entry. Entries taken off the queue live in `self._batch` until written, so
        a cancellation at shutdown cannot lose them.
        """
        first = await self.queue.get()
        self._batch.append(first)  # read `self._batch` after the wait: `flush` may have taken the old list meanwhile
        if not self._stopping and len(self._batch) + self.queue.qsize() < self.batch_size:
            self._full.clear()
            self._filling = True
            try:
                await asyncio.wait_for(self._full.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            finally:
                self._filling = False
        batch = self._batch
        while len(batch) < self.batch_size:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    async def _write(self, batch: list[Entry]) -> None:
        delay = 0.1
        while True:
            try:
                await self.sink.write(batch)
                self.last_error = None
                self.written += len(batch)
                if self.journal is not None:
                    await self._written_through(self.journal, len(batch))
                if self._on_written is not None:
                    self._on_written(len(batch))
                return
            except Exception as exc:
                self.write_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("writing %d entries to %s failed; retrying in %.1fs", len(batch), self.sink.name, delay)
                if self._stopping and delay > 2:
                    log.error("giving up on %d entries at shutdown%s", len(batch), " (kept in the journal)" if self.journal else "")
                    self._gave_up = True
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _written_through(self, journal: Journal, n: int) -> None:
        self._done += n
        journal.commit()  # the active segment's size counts what this iteration added
        journal.maybe_seal(self._queued)
        done = journal.release(self._done)
        if done:
            await asyncio.to_thread(delete, done)

    async def _run(self) -> None:
        while True:
            await self._next_batch()
            async with self._write_lock:
                batch = self._batch
                if not batch:
                    continue  # `flush` wrote it while the writer waited for the lock
                self._writing = True
                try:
                    await self._write(batch)
                    self._batch = []
                finally:
                    self._writing = False

    async def flush(self) -> None:
        """Write everything queued now, including the batch the writer is assembling.

        Writes never overlap (`_write_lock`): a later record of a request (the judge's score
        after an implicit mark) must reach the log after the earlier one, and two writes in
        flight at once could land in either order."""
        async with self._write_lock:
            # Until both are empty: while a write is awaited, the writer (waiting for the lock) may move
            # what was queued into `self._batch`, and returning then would leave it unwritten.
            while self._batch or not self.queue.empty():
                if self._batch:
                    held, self._batch = self._batch, []
                    await self._write(held)
                batch: list[Entry] = []
                while len(batch) < self.batch_size and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                if batch:
                    await self._write(batch)

    async def stop(self) -> None:
        self._stopping = True
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
        await self.sink.close()
        if self.journal is not None:
            # Everything written: nothing to replay. Otherwise the journal keeps it for the next start.
            await asyncio.to_thread(self.journal.close, clean=not self._gave_up)
