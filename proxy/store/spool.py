"""Local spool in front of the PostgreSQL log: the database being down never blocks traffic or loses a batch.

`Spool` is an append-only file of frames, one per batch:
``[u32 length][u32 crc32][msgpack list of records]``, fsynced after each batch.
A side file (``<name>.offset``) remembers how far the replay got; once every frame
has been replayed the file is truncated back to zero. A torn frame at the end
(crash during a write that was never acknowledged) is cut off at start-up.

`SpoolingStore` wraps a `PostgresLogStore`:

* `write(batch)`: while the spool is empty and the database answers, the batch
  goes straight to PostgreSQL (bounded by `write_timeout_s`). If that fails, or
  the spool already holds batches (order must be kept: feedback upserts are
  last-write-wins), the batch is appended to the spool and `write` returns.
* A background task replays spooled batches in order once the database is back.
  Writes are idempotent on the request id (and audit/event ids), so a batch that
  was written and then replayed again (e.g. a timeout after commit) never
  duplicates. A batch PostgreSQL refuses as bad data three times in a row is moved
  to ``<name>.rejected`` (never silently dropped) so it cannot block the queue.
* `close()` flushes what it can within `shutdown_flush_s`; the rest stays in the
  spool and the next start replays it.

Reads go to PostgreSQL directly (spooled rows become visible once replayed) and
raise `StoreUnavailable` while it cannot be reached.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec

from proxy.store.base import (
    AuditRecord,
    DecisionRow,
    EventRecord,
    StoreRecord,
    StoreStatus,
    StoreUnavailable,
)
from proxy.store.postgres import PostgresLogStore, is_connection_error, is_poison_error

log = logging.getLogger("thermostat.store.spool")

_HEADER = struct.Struct(">II")  # payload length, crc32(payload)
_MAX_FRAME = 256 * 1024 * 1024


def frame(payload: bytes) -> bytes:
    """One frame: ``[u32 length][u32 crc32][payload]``."""
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(fh: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, bytes]]:
    """(offset, frame size, payload) of each intact frame from `start`; stops at the first torn or corrupt one."""
    pos = start
    fh.seek(pos)
    while pos < end:
        header = fh.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, crc = _HEADER.unpack(header)
        payload = fh.read(length) if length <= _MAX_FRAME else b""
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        yield pos, _HEADER.size + length, payload
        pos += _HEADER.size + length


class Spool:
    """Append-only, fsynced, crash-tolerant file of batches (thread-safe; blocking calls)."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.offset_path = self.path.with_name(self.path.name + ".offset")
        self.rejected_path = self.path.with_name(self.path.name + ".rejected")
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fh: object | None = None
        self._frames: collections.deque[tuple[int, int, int]] = collections.deque()  # (start, size, n_records)
        self._entries = 0
        self._size = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(list[StoreRecord])
        self.rejected_batches = 0

    # --- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+b")  # noqa: SIM115 - kept open for appends
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                raise RuntimeError(
                    f"spool {self.path} is in use by another Thermostat process; give each replica its own server.data_dir"
                ) from None
            size = fh.seek(0, os.SEEK_END)
            offset = self._read_offset()
            if offset > size:
                offset = 0
            self._frames.clear()
            self._entries = 0
            for start, frame_size, payload in read_frames(fh, offset, size):
                try:
                    n = len(self._decoder.decode(payload))
                except msgspec.DecodeError:
                    break
                self._frames.append((start, frame_size, n))
                self._entries += n
            pos = self._frames[-1][0] + self._frames[-1][1] if self._frames else offset
            if pos < size:
                fh.seek(pos)
                tail = fh.read()
                log.warning("spool %s: %d byte(s) of torn/corrupt data at offset %d cut off (kept in %s.corrupt)",
                            self.path, len(tail), pos, self.path.name)
                with open(self.path.with_name(self.path.name + ".corrupt"), "ab") as bad:
                    bad.write(tail)
                fh.truncate(pos)
                os.fsync(fh.fileno())
            self._size = pos
            self._fh = fh
            if not self._frames and self._size:
                self._reset_locked()
            elif self._frames:
                log.warning("spool %s holds %d batch(es), %d record(s) from a previous run; replaying",
                            self.path, len(self._frames), self._entries)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()  # type: ignore[attr-defined]
                self._fh = None

    # --- depth -------------------------------------------------------------------------

    @property
    def batches(self) -> int:
        return len(self._frames)

    @property
    def entries(self) -> int:
        return self._entries

    @property
    def empty(self) -> bool:
        return not self._frames

    # --- operations --------------------------------------------------------------------

    def append(self, records: Sequence[StoreRecord]) -> None:
        payload = self._encoder.encode(list(records))
        frame_bytes = frame(payload)
        with self._lock:
            fh = self._require()
            fh.seek(0, os.SEEK_END)
            start = fh.tell()
            try:
                fh.write(frame_bytes)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            except BaseException:
                fh.truncate(start)  # never leave a half frame behind an acknowledged one
                raise
            self._frames.append((start, len(frame_bytes), len(records)))
            self._entries += len(records)
            self._size = start + len(frame_bytes)

    def peek(self) -> list[StoreRecord] | None:
        """The oldest pending batch (not removed), or None."""
        with self._lock:
            if not self._frames:
                return None
            start, size, _ = self._frames[0]
            fh = self._require()
            fh.seek(start + _HEADER.size)
            payload = fh.read(size - _HEADER.size)
        return self._decoder.decode(payload)

    def commit(self) -> None:
        """The oldest batch is in the database: advance, and truncate once everything is replayed."""
        with self._lock:
            if not self._frames:
                return
            start, size, n = self._frames.popleft()
            self._entries -= n
            if not self._frames:
                self._reset_locked()
            else:
                self._write_offset(start + size)

    def reject(self, records: Sequence[StoreRecord] | None = None) -> None:
        """Drop the oldest batch from the spool, keeping `records` (default: all of it) in the `.rejected` file.

        The side file uses the same frame format, so rejected records can be inspected or replayed by hand.
        """
        if records is not None and not records:
            self.commit()
            return
        with self._lock:
            if not self._frames:
                return
            if records is None:
                start, size, _ = self._frames[0]
                fh = self._require()
                fh.seek(start)
                raw = fh.read(size)
            else:
                raw = frame(self._encoder.encode(list(records)))
            with open(self.rejected_path, "ab") as side:
                side.write(raw)
                side.flush()
                os.fsync(side.fileno())
            self.rejected_batches += 1
        self.commit()

    # --- internals ---------------------------------------------------------------------

    def _require(self):  # type: ignore[no-untyped-def]
        if self._fh is None:
            raise RuntimeError("spool is not open")
        return self._fh

    def _reset_locked(self) -> None:
        fh = self._require()
        fh.truncate(0)
        fh.flush()
        self._size = 0
        try:
            self.offset_path.unlink()
        except FileNotFoundError:
            pass

    def _read_offset(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_offset(self, offset: int) -> None:
        # Not fsynced: losing it only means re-replaying batches, which is idempotent.
        tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.offset_path)


class SpoolingStore:
    """`LogStore` over PostgreSQL that spools to a local file whenever the database cannot take a batch."""

    name = "postgres"

    def __init__(
        self,
        inner: PostgresLogStore,
        spool_path: str | Path,
        *,
        write_timeout_s: float = 5.0,
        open_timeout_s: float = 5.0,
        retry_min_s: float = 0.25,
        retry_max_s: float = 5.0,
        shutdown_flush_s: float = 5.0,
        fsync: bool = True,
    ) -> None:
        self.inner = inner
        self.spool = Spool(spool_path, fsync=fsync)
        self.write_timeout_s = write_timeout_s
        self.open_timeout_s = open_timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.shutdown_flush_s = shutdown_flush_s
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.spooled_batches_total = 0  # batches that went through the spool since start
        self.replayed_batches_total = 0

    # --- depth (for metrics) ----------------------------------------------------------------

    @property
    def spool_batches(self) -> int:
        return self.spool.batches

    @property
    def spool_entries(self) -> int:
        return self.spool.entries

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the spool and try the database; never fails because PostgreSQL is down."""
        await asyncio.to_thread(self.spool.open)
        await self._try_open_inner()
        self._task = asyncio.create_task(self._replay_loop(), name="thermostat-spool-replay")
        if not self.spool.empty:
            self._wake.set()

    async def _try_open_inner(self) -> bool:
        if self.inner.is_open:
            return True
        try:
            await asyncio.wait_for(self.inner.open(), self.open_timeout_s)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means: spool and retry later
            self.inner._failed(exc)
            self.inner.connected = False
            log.warning("PostgreSQL unreachable (%s: %s); decisions are spooled to %s until it is back",
                        type(exc).__name__, exc, self.spool.path)
            return False

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: S110, BLE001 - the replayer is being stopped
                pass
            self._task = None
        deadline = time.monotonic() + self.shutdown_flush_s
        if not self.spool.empty:
            await self._drain_until(deadline)
        if not self.spool.empty:
            log.warning("shutdown: %d batch(es), %d record(s) left in %s for the next start",
                        self.spool.batches, self.spool.entries, self.spool.path)
        await self.inner.close()
        await asyncio.to_thread(self.spool.close)

    # --- writes ------------------------------------------------------------------------

    async def write(self, entries: Sequence[StoreRecord]) -> None:
        if not entries:
            return
        async with self._write_lock:
            if self.spool.empty and self.inner.is_open and not self._closing:
                try:
                    await asyncio.wait_for(self.inner.write(entries), self.write_timeout_s)
                    return
                except Exception as exc:  # noqa: BLE001 - any failure means: spool and retry later
                    self.inner._failed(exc)
                    log.warning("PostgreSQL write of %d record(s) failed (%s: %s); spooling",
                                len(entries), type(exc).__name__, exc)
            await asyncio.to_thread(self.spool.append, list(entries))
            self.spooled_batches_total += 1
        self._wake.set()

    async def append_audit(self, record: AuditRecord) -> None:
        await self.write([record])

    async def append_event(self, record: EventRecord) -> None:
        await self.write([record])

    # --- replay ------------------------------------------------------------------------

    async def _replay_one(self) -> bool:
        """Write the oldest spooled batch; True if the spool advanced."""
        self._replaying += 1
        try:
            return await self._replay_one_inner()
        finally:
            self._replaying -= 1

    _replaying = 0

    async def _replay_one_inner(self) -> bool:
        if not await self._try_open_inner():
            return False
        batch = await asyncio.to_thread(self.spool.peek)
        if batch is None:
            return True
        try:
            await asyncio.wait_for(self.inner.write(batch), self.write_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure means: spool and retry later
            self.inner._failed(exc)
            if is_poison_error(exc):
                self._poison_attempts += 1
                if self._poison_attempts >= 3:
                    return await self._split_poisoned(batch, exc)
            elif not is_connection_error(exc):
                log.warning("replaying a spooled batch failed (%s: %s); will retry", type(exc).__name__, exc)
            return False
        self._poison_attempts = 0
        await asyncio.to_thread(self.spool.commit)
        self.replayed_batches_total += 1
        if self.spool.empty:
            log.info("spool drained: PostgreSQL has every spooled batch")
        return True

    _poison_attempts = 0

    async def _split_poisoned(self, batch: list[StoreRecord], exc: BaseException) -> bool:
        """The database keeps refusing this batch as bad data: write its records one by one, set the bad ones aside."""
        bad: list[StoreRecord] = []
        for record in batch:
            try:
                await asyncio.wait_for(self.inner.write([record]), self.write_timeout_s)
            except Exception as one_exc:  # noqa: BLE001 - any failure means: spool and retry later
                if not is_poison_error(one_exc):
                    return False  # the database went away meanwhile: retry the whole batch later (idempotent)
                bad.append(record)
        log.error("PostgreSQL refuses %d of %d spooled record(s) as bad data (%s: %s); moved to %s",
                  len(bad), len(batch), type(exc).__name__, exc, self.spool.rejected_path)
        await asyncio.to_thread(self.spool.reject, bad)
        self._poison_attempts = 0
        self.replayed_batches_total += 1
        return True

    async def _replay_loop(self) -> None:
        delay = self.retry_min_s
        while not self._closing:
            if self.spool.empty:
                self._wake.clear()
                if self.spool.empty:
                    await self._wake.wait()
                continue
            if await self._replay_one():
                delay = self.retry_min_s
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    async def _drain_until(self, deadline: float) -> None:
        delay = self.retry_min_s
        while not self.spool.empty and time.monotonic() < deadline:
            if not await self._replay_one():
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, self.retry_max_s)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the spool is empty (tests, graceful shutdown); True if it is."""
        deadline = time.monotonic() + timeout
        while (not self.spool.empty or self._replaying) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.02)
        return self.spool.empty and not self._replaying

    # --- reads (PostgreSQL only) ----------------------------------------------------------

    def _reader(self) -> PostgresLogStore:
        if not self.inner.is_open:
            raise StoreUnavailable(f"PostgreSQL is unreachable ({self.inner.last_error or 'not connected'})")
        return self.inner

    async def _read(self, coro_fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        reader = self._reader()
        try:
            return await coro_fn(reader, *args, **kwargs)
        except Exception as exc:
            if is_connection_error(exc):
                raise StoreUnavailable(f"PostgreSQL is unreachable ({type(exc).__name__}: {exc})") from exc
            raise

    async def fetch_decisions(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        mode: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[DecisionRow]:
        return await self._read(PostgresLogStore.fetch_decisions, since=since, until=until, task_type=task_type,
                                mode=mode, limit=limit, offset=offset)

    async def get_decision(self, request_id: str) -> DecisionRow | None:
        return await self._read(PostgresLogStore.get_decision, request_id)

    async def count_decisions(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        mode: str | None = None,
    ) -> int:
        return await self._read(PostgresLogStore.count_decisions, since=since, until=until, task_type=task_type, mode=mode)

    async def fetch_audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        return await self._read(PostgresLogStore.fetch_audit, limit, offset)

    async def get_audit(self, audit_id: str) -> AuditRecord | None:
        return await self._read(PostgresLogStore.get_audit, audit_id)

    async def count_audit(self) -> int:
        return await self._read(PostgresLogStore.count_audit)

    async def fetch_events(self, limit: int = 100, since: float | None = None) -> list[EventRecord]:
        return await self._read(PostgresLogStore.fetch_events, limit, since)

    async def prune(self, older_than_s: float, batch_size: int = 5000) -> int:
        return await self._read(PostgresLogStore.prune, older_than_s, batch_size)

    @property
    def last_prune_batches(self) -> int:
        return self.inner.last_prune_batches

    def status(self) -> StoreStatus:
        st = self.inner.status()
        return StoreStatus(
            kind="postgres",
            connected=st.connected,
            last_error=st.last_error,
            spool_batches=self.spool.batches,
            spool_entries=self.spool.entries,
            rows_written=st.rows_written,
            dead_letter_batches=self.spool.rejected_batches,
        )
