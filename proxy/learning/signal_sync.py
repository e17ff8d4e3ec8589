"""Quality-signal counts and judge/explicit pairs that survive a restart and are shared between replicas.

Two pieces of state decide what the automatic quality loop may do, and both used to live in
one process's memory:

* per task type, the number of quality signals that can see temperature
  (`proxy.decision.decider.QualitySignals`); temperature unlocks at
  `optimization.min_quality_signals`. Lost on restart, a task type locked temperature again
  and re-earned its signals; with N replicas each one unlocked on its own count, so the
  fleet needed N times the evidence, and replicas disagreed on whether temperature moves;
* per task type, the last (judge, explicit) pairs (`proxy.decision.feedback.SignalBook`),
  which decide whether the judge's scores count (`policies.agreement.judge_trusted`).

Why persisted, not rebuilt from the decision log at start-up: `decision_feedback` keeps one
row per request, and explicit feedback replaces the judge's row, so the pairs are not in
the log at all; the counts would be (rows by source), but retention pruning would lower them
and, with replicas, a rebuild at start-up still leaves each replica counting alone until
its next restart. So both are written where the rest of the restart state lives:

Embedded default (no Redis)
    Maps of the `InProcessStore` that `proxy.store.local_state.LocalState` journals and
    snapshots under ``data_dir/state``: ``quality:signals`` (task -> count) and
    ``quality:pairs:<task>`` (request id -> "judge explicit at"), plus the index
    ``quality:pair-tasks``. This process is the only writer, so absolute values are written.
    Flushed every `journal_fsync_interval_s` (a `kill -9` forgets at most that much, like
    the journal's own fsync window) and at shutdown.

Redis (several replicas)
    ``<prefix>quality:signals`` is a hash task -> count changed with HINCRBY, capped at
    `server.max_task_types` fields (a new task type past the cap is not counted: the safe
    side, temperature stays put); ``<prefix>quality:pairs:<task>`` holds at most
    `max_pairs` pairs (the oldest by time dropped), and ``quality:pair-tasks`` indexes them,
    capped like the counts. One Lua script applies a batch atomically; the batch carries a
    per-replica sequence number (``quality:seq:<replica>``) so a batch whose reply was lost
    is retried without being counted twice. Every key expires after `storage.state_ttl_s`
    without a write or a read. Every `storage.sync_interval_s` each replica pushes what it
    counted and, when ``quality:version`` moved, reads the merged totals back: a signal
    counted on one replica unlocks temperature on all of them within one interval.
    Redis down: counts keep accumulating locally and are pushed when it answers.

Nothing here runs on the request path: `QualitySignals.count` stays an in-memory lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from guards.state import InProcessStore, StateStore, StoreUnavailable
from proxy.decision import QualitySignals, SignalBook

log = logging.getLogger("thermostat.signals")

COUNTS_KEY = "quality:signals"
PAIR_TASKS_KEY = "quality:pair-tasks"
VERSION_KEY = "quality:version"

Pair = tuple[float, float, float]  # (judge quality, explicit quality, unix time the pair formed)


def pairs_key(task_type: str) -> str:
    return f"quality:pairs:{task_type}"


def encode_pair(pair: Pair) -> bytes:
    return f"{pair[0]!r} {pair[1]!r} {pair[2]!r}".encode()


def decode_pair(raw: bytes | str) -> Pair | None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        judge, explicit, at = (float(x) for x in text.split())
    except ValueError:
        return None
    return judge, explicit, at


class SyncedQualitySignals(QualitySignals):
    """`QualitySignals` that remembers what it counted since the last push (`SignalSync`)."""

    def __init__(self, max_task_types: int = 4096) -> None:
        super().__init__(max_task_types)
        self.unsaved: dict[str, int] = {}

    def add(self, task_type: str, n: int = 1) -> None:
        if task_type in self.counts or len(self.counts) < self.max_task_types:
            super().add(task_type, n)
            self.unsaved[task_type] = self.unsaved.get(task_type, 0) + n

    def adopt(self, totals: dict[str, int]) -> None:
        """The shared totals, plus what this process counted and has not pushed yet; capped like `add`."""
        merged: dict[str, int] = {}
        for task, n in totals.items():
            if len(merged) < self.max_task_types:
                merged[task] = max(0, int(n))
        for task, n in self.unsaved.items():
            if task in merged or len(merged) < self.max_task_types:
                merged[task] = merged.get(task, 0) + n
        self.counts = merged


class SyncedSignalBook(SignalBook):
    """`SignalBook` whose agreement pairs carry the time they formed and are remembered until pushed."""

    def __init__(self, max_entries: int = 100_000, max_pairs: int = 1000, max_task_types: int = 4096) -> None:
        super().__init__(max_entries=max_entries, max_pairs=max_pairs)
        self.max_task_types = max_task_types
        self.pair_at: dict[str, dict[str, float]] = {}  # task -> request id -> unix time the pair formed
        self.unsaved_pairs: OrderedDict[tuple[str, str], Pair] = OrderedDict()

    def _pair(self, task_type: str, request_id: str, judge: float, explicit: float) -> None:
        if task_type not in self.pairs and len(self.pairs) >= self.max_task_types:
            return  # client-controlled keys never grow state without bound
        super()._pair(task_type, request_id, judge, explicit)
        at = time.time()
        times = self.pair_at.setdefault(task_type, {})
        times[request_id] = at
        self.unsaved_pairs[(task_type, request_id)] = (judge, explicit, at)
        self.unsaved_pairs.move_to_end((task_type, request_id))
        while len(self.unsaved_pairs) > self.max_entries:
            self.unsaved_pairs.popitem(last=False)
        if len(times) > len(self.pairs[task_type]):  # the base class dropped its oldest pair
            kept = self.pairs[task_type]
            for rid in [r for r in times if r not in kept]:
                del times[rid]

    def pairs_with_time(self, task_type: str) -> dict[str, Pair]:
        times = self.pair_at.get(task_type, {})
        return {rid: (j, e, times.get(rid, 0.0)) for rid, (j, e) in self.pairs.get(task_type, {}).items()}

    def adopt_pairs(self, shared: dict[str, dict[str, Pair]]) -> None:
        """The shared pairs per task type (newest `max_pairs` by time), with the unpushed local ones on top."""
        merged: dict[str, dict[str, Pair]] = {}
        for task, pairs in shared.items():
            if len(merged) < self.max_task_types:
                merged[task] = dict(pairs)
        for (task, rid), pair in self.unsaved_pairs.items():
            if task in merged or len(merged) < self.max_task_types:
                merged.setdefault(task, {})[rid] = pair
        self.pairs = {}
        self.pair_at = {}
        for task, pairs in merged.items():
            ordered = sorted(pairs.items(), key=lambda kv: kv[1][2])[-self.max_pairs :]
            self.pairs[task] = OrderedDict((rid, (j, e)) for rid, (j, e, _) in ordered)
            self.pair_at[task] = {rid: at for rid, (_, _, at) in ordered}


# --- Redis --------------------------------------------------------------------------------

# KEYS: counts hash, this replica's seq key, version key, pair-task index, then one pairs hash per task in the batch.
# ARGV: seq, ttl ms, max task types, max pairs, n counts, (task, increment)..., then (KEYS index, task, rid, value)...
# Returns the version after the batch (unchanged when the batch was already applied).
_PUSH = """
local seq = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local max_tasks = tonumber(ARGV[3])
local max_pairs = tonumber(ARGV[4])
local done = tonumber(redis.call('GET', KEYS[2]) or '0')
if seq <= done then
  return tonumber(redis.call('GET', KEYS[3]) or '0')
end
redis.call('SET', KEYS[2], seq, 'PX', ttl)
local n = tonumber(ARGV[5])
local i = 6
for _ = 1, n do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 or redis.call('HLEN', KEYS[1]) < max_tasks then
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
while i <= #ARGV do
  local k = KEYS[tonumber(ARGV[i])]
  local task = ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[4], task) == 1 or redis.call('HLEN', KEYS[4]) < max_tasks then
    redis.call('HSET', KEYS[4], task, '1')
    redis.call('HSET', k, ARGV[i + 2], ARGV[i + 3])
    while redis.call('HLEN', k) > max_pairs do
      local all = redis.call('HGETALL', k)
      local oldest, oldest_at = nil, nil
      for j = 1, #all, 2 do
        local at = tonumber(string.match(all[j + 1], '(%S+)$')) or 0
        if oldest_at == nil or at < oldest_at then oldest, oldest_at = all[j], at end
      end
      redis.call('HDEL', k, oldest)
    end
    redis.call('PEXPIRE', k, ttl)
  end
  i = i + 4
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
local v = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ttl)
return v
"""


class _Batch:
    __slots__ = ("counts", "pairs", "seq")

    def __init__(self, seq: int, counts: dict[str, int], pairs: dict[tuple[str, str], Pair]) -> None:
        self.seq = seq
        self.counts = counts
        self.pairs = pairs


class SignalSync:
    """Loads, pushes and (with Redis) re-reads the counts and pairs; see the module docstring."""

    def __init__(
        self,
        store: StateStore,
        counts: SyncedQualitySignals,
        book: SyncedSignalBook,
        *,
        interval_s: float,
        ttl_s: float = 30 * 86_400.0,
    ) -> None:
        self.store = store
        self.counts = counts
        self.book = book
        self.interval_s = interval_s
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.shared = not isinstance(store, InProcessStore)
        self._script: Any = None
        self._seq = int(time.time() * 1000)  # above any number a previous run of this replica used
        self._inflight: _Batch | None = None
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._down = False
        self.pushes = 0
        if self.shared:
            redis = getattr(store, "redis", None)
            if redis is None:
                raise TypeError("a shared signal store needs a RedisStore")
            self._script = redis.register_script(_PUSH)

    # -- start / stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the stored state before serving (a failed read leaves the counts empty: the safe side)."""
        try:
            await self.refresh(force=True)
        except StoreUnavailable as exc:
            log.warning("quality signal counts not loaded at start-up (%s); they are read again every %.3gs", exc, self.interval_s)
        self._task = asyncio.create_task(self._forever(), name="thermostat-signal-sync")

    async def stop(self, timeout_s: float = 2.0) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await asyncio.wait_for(self.push(), timeout=timeout_s)
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("quality signal counts not saved at shutdown: %s", exc)

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sync_once()
                if self._down:
                    self._down = False
                    log.info("quality signal counts synced again")
            except StoreUnavailable as exc:
                if not self._down:
                    self._down = True
                    log.warning("quality signal counts not synced (%s); kept locally and retried", exc)
            except Exception:
                log.exception("quality signal sync failed")

    async def sync_once(self) -> None:
        await self.push()
        if self.shared:
            await self.refresh()

    # -- push -----------------------------------------------------------------------------

    def _take(self) -> _Batch | None:
        if self._inflight is not None:
            return self._inflight  # retried with its own number until acknowledged
        if not self.counts.unsaved and not self.book.unsaved_pairs:
            return None
        self._seq += 1
        batch = _Batch(self._seq, dict(self.counts.unsaved), dict(self.book.unsaved_pairs))
        self.counts.unsaved.clear()
        self.book.unsaved_pairs.clear()
        self._inflight = batch
        return batch

    async def push(self) -> None:
        batch = self._take()
        if batch is None:
            return
        if self.shared:
            await self._push_redis(batch)
        else:
            await self._push_local(batch)
        self._inflight = None
        self.pushes += 1

    async def _push_local(self, batch: _Batch) -> None:
        """Absolute values into the journaled `InProcessStore` maps (this process is the only writer)."""
        for task in batch.counts:
            await self.store.map_put(COUNTS_KEY, task, str(self.counts.count(task)).encode())
        for task in {task for task, _ in batch.pairs}:
            key = pairs_key(task)
            now = self.book.pairs_with_time(task)
            await self.store.map_put(PAIR_TASKS_KEY, task, b"1")
            stored = await self.store.map_get_all(key)
            for rid in stored.keys() - now.keys():
                await self.store.map_delete(key, rid)
            for rid, pair in now.items():
                value = encode_pair(pair)
                if stored.get(rid) != value:
                    await self.store.map_put(key, rid, value)

    async def _push_redis(self, batch: _Batch) -> None:
        store: Any = self.store
        tasks = sorted({task for task, _ in batch.pairs})
        keys = [store.k(COUNTS_KEY), store.k(f"quality:seq:{store.instance_id}"), store.k(VERSION_KEY), store.k(PAIR_TASKS_KEY)]
        keys += [store.k(pairs_key(task)) for task in tasks]
        index = {task: 5 + i for i, task in enumerate(tasks)}  # Lua KEYS are 1-based
        args: list[Any] = [batch.seq, self.ttl_ms, self.counts.max_task_types, self.book.max_pairs, len(batch.counts)]
        for task, n in batch.counts.items():
            args += [task, n]
        for (task, rid), pair in batch.pairs.items():
            args += [index[task], task, rid, encode_pair(pair)]
        await store._call(self._script(keys=keys, args=args))

    # -- read back (Redis) ----------------------------------------------------------------

    async def refresh(self, *, force: bool = False) -> None:
        """Adopt the stored totals and pairs: always on the embedded store at start-up; with Redis when the version moved."""
        if not self.shared:
            if force:
                counts = await self.store.map_get_all(COUNTS_KEY)
                pairs = {task: await self.store.map_get_all(pairs_key(task)) for task in await self.store.map_get_all(PAIR_TASKS_KEY)}
                self._adopt(counts, pairs)
            return
        store: Any = self.store
        redis = store.redis
        known = sorted(self.book.pairs)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(store.k(VERSION_KEY))
            for key in (COUNTS_KEY, PAIR_TASKS_KEY, VERSION_KEY, *(pairs_key(t) for t in known)):
                pipe.pexpire(store.k(key), self.ttl_ms)  # read is use: an idle fleet keeps its counts
            raw_version, *_ = await store._call(pipe.execute())
        version = int(raw_version or 0)
        if not force and version == self._version:
            return
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(store.k(COUNTS_KEY))
            pipe.hkeys(store.k(PAIR_TASKS_KEY))
            counts_raw, task_names = await store._call(pipe.execute())
        names = [t.decode() if isinstance(t, bytes) else str(t) for t in task_names]
        async with redis.pipeline(transaction=False) as pipe:
            for task in names:
                pipe.hgetall(store.k(pairs_key(task)))
            pair_rows = await store._call(pipe.execute()) if names else []
        counts = {(k.decode() if isinstance(k, bytes) else str(k)): bytes(v) if isinstance(v, bytes) else str(v).encode()
                  for k, v in counts_raw.items()}
        pairs = {
            task: {(k.decode() if isinstance(k, bytes) else str(k)): bytes(v) if isinstance(v, bytes) else str(v).encode() for k, v in row.items()}
            for task, row in zip(names, pair_rows, strict=True)
        }
        self._adopt(counts, pairs)
        self._version = version

    def _adopt(self, counts: dict[str, bytes], pairs: dict[str, dict[str, bytes]]) -> None:
        totals: dict[str, int] = {}
        for task, raw in counts.items():
            try:
                totals[task] = int(raw)
            except ValueError:
                continue
        if self._inflight is not None:  # not acknowledged yet: still this process's own, pushed again later
            for task, n in self._inflight.counts.items():
                totals[task] = totals.get(task, 0) + n
        self.counts.adopt(totals)
        decoded: dict[str, dict[str, Pair]] = {}
        for task, row in pairs.items():
            for rid, raw in row.items():
                pair = decode_pair(raw)
                if pair is not None:
                    decoded.setdefault(task, {})[rid] = pair
        if self._inflight is not None:
            for (task, rid), pair in self._inflight.pairs.items():
                decoded.setdefault(task, {})[rid] = pair
        self.book.adopt_pairs(decoded)
