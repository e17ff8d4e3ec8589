"""Crash journal in front of the recorder's queue: an answered request survives `kill -9`.

The recorder's queue lives in memory, so a process killed mid-load used to lose what
it had answered but not yet written (the last ~0.3 s). Every record the recorder
queues, and every decision before its request is forwarded, is first appended here
as one frame (the spool's format, ``[u32 length][u32 crc32][msgpack]``) with a plain
`os.write` on an ``O_APPEND`` descriptor: a few microseconds, and the kernel's page
cache keeps it when the process dies. A background thread fsyncs dirty segments every
`fsync_interval_s` for power loss; nothing on the request path waits for a disk.

Group commit: the request path uses `add`, which encodes the frame straight into a
buffer; the first `add` of an event-loop iteration schedules `commit` with
`loop.call_soon`, so every frame added in one iteration goes out in one `os.write` at
the start of the next, before any I/O callback of that iteration runs. A frame added
before a request is forwarded is therefore on disk before its answer can be relayed:
the answer needs the upstream's reply, which only an I/O callback of a later iteration
delivers (and the edge calls `commit` once more before relaying, which costs nothing
when the buffer is empty). `append` writes at once (tests, and anything not on the
request path).

One record per request: the decision is journaled once, before forwarding
(`PendingDecision`); the frame after the request carries only what the decision does
not (`Completion`: outcome, context features, prompt), and replay joins the two into
the `LogEntry` (a completion whose decision is in a segment that was already released
cannot happen: the recorder journals a full `LogEntry` when the segment changed in
between).

Segments: the journal is a series of files ``journal.<n>.log`` in one folder, one
folder per process (the spool's folder, so `serve --workers N` slots apply). Once the
active segment passes `segment_bytes` it is sealed with the number of records the
recorder had queued at that moment; the recorder deletes a sealed segment when it
has written that many. A clean stop deletes everything. What is left at start-up was
not confirmed written: `open()` reads it back (a torn frame at the end is cut off) and
the recorder replays it into the log store, whose writes are idempotent on the request
id, before deleting it.

A decision whose request was forwarded but whose outcome never reached the journal
(the process died mid-request) is replayed as an outcome with ``status = 0`` and
``error_class = "interrupted"``: the request was decided and may have been answered,
so the log must hold it, but its result is unknown.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from policies.records import Decision, Outcome
from proxy.store.base import StoreRecord
from proxy.store.entries import LogEntry
from proxy.store.spool import _HEADER, frame, read_frames

log = logging.getLogger("thermostat.store.journal")

INTERRUPTED = "interrupted"


class PendingDecision(msgspec.Struct, tag="pending"):
    """A decision journaled before forwarding; its `LogEntry` follows once the request ends."""

    decision: Decision


class Completion(msgspec.Struct, tag="completion"):
    """What a finished request adds to its `PendingDecision` (journaled earlier): together, one `LogEntry`."""

    request_id: str
    outcome: Outcome
    context_features: dict[str, object] = {}
    prompt: str | None = None


JournalRecord = StoreRecord | PendingDecision | Completion


def replay_records(records: Sequence[JournalRecord]) -> list[StoreRecord]:
    """Journal contents -> what the log store must receive, in journal order.

    A completion is joined with its pending decision into a `LogEntry`; a pending decision
    without either becomes an interrupted outcome; a request id logged twice (it cannot be,
    but a replay must never duplicate) keeps the first.
    """
    decisions = {r.decision.request_id: r.decision for r in records if isinstance(r, PendingDecision)}
    joined: list[StoreRecord | PendingDecision] = []
    for r in records:
        if not isinstance(r, Completion):
            joined.append(r)
            continue
        decision = decisions.get(r.request_id)
        if decision is None:  # its decision frame was lost (cannot happen, see the module docstring): nothing to log it with
            log.warning("journal: the outcome of %s has no decision frame; skipped", r.request_id)
            continue
        joined.append(LogEntry(decision=decision, outcome=r.outcome, context_features=r.context_features, prompt=r.prompt))
    finished = {r.decision.request_id for r in joined if isinstance(r, LogEntry)}
    seen: set[str] = set()
    out: list[StoreRecord] = []
    for r in joined:
        if isinstance(r, PendingDecision):
            rid = r.decision.request_id
            if rid in finished or rid in seen:
                continue
            seen.add(rid)
            out.append(LogEntry(decision=r.decision, outcome=Outcome(request_id=rid, status=0, latency_s=0.0, error_class=INTERRUPTED)))
        elif isinstance(r, LogEntry):
            rid = r.decision.request_id
            if rid in seen:
                continue
            seen.add(rid)
            out.append(r)
        else:
            out.append(r)
    return out


class Journal:
    """Append-only segments of frames, one record per frame (see the module docstring).

    `append` runs on the event loop; the fsync thread only fsyncs and closes
    descriptors the loop has handed over, under `_lock`.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        fsync_interval_s: float = 0.2,
        segment_bytes: int = 16 * 1024 * 1024,
        name: str = "journal",
        record_type: Any = JournalRecord,
    ) -> None:
        self.folder = Path(folder)
        self.name = name  # segments <name>.<n>.log, lock <name>.lock
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._encode = self._encoder.encode
        self._decode = msgspec.msgpack.Decoder(record_type).decode
        self._lock = threading.Lock()
        self._lock_fd = -1
        self._fd = -1
        self._seq = 0
        self._size = 0
        self._dirty = False
        self._sealed: list[tuple[Path, int]] = []  # (segment, records queued when it was sealed)
        self._leftover: list[Path] = []  # segments from a previous run, deleted once replayed
        self._to_sync: list[int] = []  # sealed descriptors: fsync, then close
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._buffer = bytearray()  # frames added this loop iteration (group commit)
        self._buffered = 0
        self._scheduled = False
        self.appended = 0
        self.commits = 0  # os.write calls of the group commit
        self.fsyncs = 0
        self.failures = 0

    # --- lifecycle ---------------------------------------------------------------------

    def open(self) -> list[Any]:
        """Lock the folder, read what a previous run left, start a fresh segment. Blocking."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f"{self.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(
                f"journal {self.folder} is in use by another Thermostat process; give each replica its own server.data_dir"
            ) from None
        self._lock_fd = fd
        records: list[JournalRecord] = []
        self._leftover = sorted(self.folder.glob(f"{self.name}.*.log"), key=_segment_number)
        for path in self._leftover:
            records.extend(self._read_segment(path))
        self._seq = max((_segment_number(p) for p in self._leftover), default=0)
        self._fd = self._new_segment()
        self._thread = threading.Thread(target=self._fsync_forever, name="thermostat-journal-fsync", daemon=True)
        self._thread.start()
        if records:
            log.warning("journal %s holds %d record(s) from a previous run; replaying", self.folder, len(records))
        return records

    def _read_segment(self, path: Path) -> list[Any]:
        out: list[Any] = []
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            pos = 0
            for start, size, payload in read_frames(fh, 0, end):
                try:
                    out.append(self._decode(payload))
                except msgspec.DecodeError:
                    break
                pos = start + size
            if pos < end:
                log.warning("journal %s: %d byte(s) of torn data at offset %d ignored", path, end - pos, pos)
        return out

    def _new_segment(self) -> int:
        self._seq += 1
        self._size = 0
        path = self.folder / f"{self.name}.{self._seq:010d}.log"
        return os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)

    def replayed(self) -> None:
        """The previous run's records are in the log store: delete their segments."""
        delete(self._leftover)
        self._leftover = []

    def close(self, *, clean: bool) -> None:
        """Stop the fsync thread; `clean` (everything written) deletes every segment. Blocking."""
        if self._lock_fd < 0:
            return  # never opened (or already closed): the folder may belong to another process
        self.commit()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            fds = [*self._to_sync, self._fd]
            self._to_sync = []
            self._fd = -1
        for fd in fds:
            if fd >= 0:
                if not clean:
                    os.fsync(fd)
                os.close(fd)
        if clean:
            keep = set(self._leftover)  # not replayed (the log store refused): the next start tries again
            for path in self.folder.glob(f"{self.name}.*.log"):
                if path not in keep:
                    path.unlink()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- the request path --------------------------------------------------------------

    def append(self, record: Any) -> None:
        """One frame, one `os.write` now (microseconds; no fsync here), after whatever `add` buffered."""
        self.commit()
        self._write(frame(self._encode(record)), 1)

    def add(self, record: Any) -> None:
        """One frame into the group-commit buffer, written with the rest of this loop iteration's (see the module docstring)."""
        buf = self._buffer
        start = len(buf)
        self._encoder.encode_into(record, buf, start + _HEADER.size)
        _HEADER.pack_into(buf, start, len(buf) - start - _HEADER.size, zlib.crc32(memoryview(buf)[start + _HEADER.size :]))
        self._buffered += 1
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.commit)
            except RuntimeError:  # no loop (a tool, a test): nothing groups the writes
                self.commit()
                return
            self._scheduled = True

    def commit(self) -> None:
        """Write what `add` buffered, in one `os.write`; nothing to do when the buffer is empty."""
        self._scheduled = False
        if not self._buffered:
            return
        data, n = bytes(self._buffer), self._buffered
        self._buffer.clear()
        self._buffered = 0
        self.commits += 1
        self._write(data, n)

    def _write(self, data: bytes, n: int) -> None:
        try:
            os.write(self._fd, data)
        except OSError as exc:  # disk full, closed: the queue still carries the records
            self.failures += 1
            if self.failures == 1 or self.failures % 10_000 == 0:
                log.error("journal append failed (%d so far): %s", self.failures, exc)
            return
        self._size += len(data)
        self._dirty = True
        self.appended += n

    @property
    def segment(self) -> int:
        """The active segment's number: frames added now land in it (`seal` starts the next)."""
        return self._seq

    def maybe_seal(self, queued: int) -> None:
        """Start a new segment once the active one is large; `queued` = records the recorder has queued so far."""
        if self._size >= self.segment_bytes:
            self.seal(queued)

    def seal(self, mark: int) -> None:
        """Close the active segment under `mark` (`release(n)` deletes it once `n >= mark`) and start a new one."""
        if self._fd < 0:
            return
        self.commit()  # what was added before the seal belongs to the sealed segment
        sealed = self.folder / f"{self.name}.{self._seq:010d}.log"
        new_fd = self._new_segment()
        with self._lock:
            self._to_sync.append(self._fd)
            self._fd = new_fd
        self._sealed.append((sealed, mark))

    def release(self, written: int) -> list[Path]:
        """Sealed segments whose records are all written (`written` = records the recorder wrote so far)."""
        done = [path for path, upto in self._sealed if upto <= written]
        if done:
            self._sealed = [(p, u) for p, u in self._sealed if u > written]
        return done

    # --- background fsync ----------------------------------------------------------------

    def _fsync_forever(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            self.sync()

    def sync(self) -> None:
        """fsync what was appended since the last call (the fsync thread; also tests)."""
        with self._lock:
            sealed, self._to_sync = self._to_sync, []
            fd = self._fd
            dirty, self._dirty = self._dirty, False
        for old in sealed:
            os.fsync(old)
            os.close(old)
        if dirty and fd >= 0:
            try:
                os.fsync(fd)
                self.fsyncs += 1
            except OSError:  # closed by close() meanwhile; close() fsyncs itself
                pass


def delete(paths: Sequence[Path]) -> None:
    """Unlink released segments (blocking; callers run it in a thread). A failure only leaves a replay to do."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete journal segment %s: %s", path, exc)


def _segment_number(path: Path) -> int:
    try:
        return int(path.name.split(".")[1])
    except (IndexError, ValueError):
        return 0
