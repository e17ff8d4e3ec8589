"""Shared state between Thermostat replicas through Redis: posterior, rollout, decisions.

`SharedState` is a set of background tasks next to one process's policy, costs and rollout; nothing here runs on
the request path except `SharedDecisionRegistry.register/complete`, which only put the
record on a bounded in-memory queue.

Policy statistics (every `storage.sync_interval_s`, default 1 s)
    The policy's and the baseline costs' `export_delta()` increments are pushed and the
    merged totals read back in ONE Lua script (atomic, one round trip):
    ``HINCRBYFLOAT <prefix>policy:<name>:<family> "<stat key>#<component>" <increment>``
    (and the same on ``<prefix>costs:<family>``), then read back the fields changed since
    this replica's last read: every applied batch bumps ``v`` in ``<prefix>state-version:<family>``
    and ZADDs each field it touched into ``<hash>:changes`` with that version as score,
    so the read is a ZRANGEBYSCORE over the versions not seen yet plus one HGET per
    changed field. The totals go to `load_changed` (all of them to `load_totals` on the
    first sync, after an outage, or when the version hash was recreated: its random
    ``epoch`` then differs from the one this replica saw), which keeps
    increments made meanwhile on top. So every replica converges to the same posterior,
    a replica that (re)starts begins from the merged state, not from the prior (`start()`
    syncs once before serving), and an idle replica's sync costs O(1), whatever the size
    of the state. Every sync pushes the expiry of these keys `storage.state_ttl_s` ahead:
    a family no replica has synced for that long is dropped by Redis.

    Exactly once: a pushed batch carries a per-replica sequence number, and the script
    skips a batch whose number it has already applied (``<prefix>sync-seq:<replica>``).
    A push whose reply is lost (timeout, killed connection) is retried with the same
    number until it is acknowledged, while new increments wait in the next batch; so
    nothing is lost and nothing counted twice.

    `storage.policy_family` names the posterior: bump it to start a fresh shared one
    (e.g. after changing the arm grid or the LinUCB features).

    Discounting (`[policy] half_life_s`, `policies.base.Discount`). Every replica derives the
    same epoch from its clock and multiplies its statistics and unexported increments by
    γ per epoch boundary (`Adaptive.advance`). The store's totals are decayed by the same
    script, once per boundary: the first push that names a later epoch multiplies every
    field of the policy hash (not the ``~`` bookkeeping fields such as reopen counts) by
    γ^(epochs passed), records the epoch (``decay:<policy hash>`` in the version hash) and
    renews the version hash's ``epoch``, so every replica reads all totals again.
    Increments stamped with an earlier epoch (a retry across a boundary) are scaled by
    γ^(epochs behind) before they are added, and a replica whose clock lags adopts the
    store's epoch. Since γ^k·(a + b) = γ^k·a + γ^k·b, the merged totals are those of one
    process that saw every reward, decayed.

Rollout state (phase, rollback, traffic)
    Stored as the ``rollout:state`` blob (`guards.rollout.save_state`; the runtime saves
    it after every transition). `RedisStore.set` publishes every blob write on
    ``<prefix>changes``; the listener here reloads the blob and swaps it into
    the decider's ``rollout.state``, so a rollback posted to one replica holds on every replica
    within milliseconds. The periodic sync also reads the blob, which covers messages
    missed while the pub/sub connection was being re-established.

Decisions (delayed feedback may reach any replica)
    Every decision (msgpack of ``(Decision, None)``) and, once it completes, its outcome
    (``(Decision, Outcome)``) is written to ``<prefix>decision:<request id>`` with a TTL
    of `storage.decision_ttl_s`, by a writer task that batches what is queued into one
    pipeline. `find_decision(request_id)` looks in the local registry first, then in
    Redis.

Redis unreachable
    Logged once (and once more when it is back); each replica carries on with its local
    state: the policy keeps learning locally, increments accumulate, decisions queue up
    (bounded; the oldest are dropped past `max_pending_decisions`). Retries back off
    from 0.25 s to 5 s. When Redis answers again, the pending increments are pushed,
    rollout blobs whose write failed are written, and the merged state is loaded back.
    Nothing here raises into the request path; the budget guard applies `require_caws`
    on its own when its store calls fail.

Observability: `status()` (for the control API / metrics), and a heartbeat per replica
(``<prefix>replica:<id>``, JSON, expires after a few sync intervals) with the digest of
its posterior, its rollout phase and rollback flag, so an operator (or a test) can see
that all replicas agree.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from guards.rollout import STATE_KEY, RolloutController, RolloutState
from policies.base import RESERVED_PREFIX, Adaptive, Policy
from policies.records import Decision, Outcome
from policies.reward import BaselineCosts
from proxy.config import StorageSettings
from proxy.decision import DecisionRegistry
from proxy.store import RedisStore

log = logging.getLogger("thermostat.shared")

_DecisionRecord = tuple[Decision, Outcome | None]
_encode = msgspec.msgpack.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(tuple[Decision, Outcome | None]).decode

# KEYS: seq key, policy hash, costs hash, rollout blob, policy change index, costs change index, version hash.
# ARGV: seq (0 = nothing to push), seq ttl ms, state ttl ms, since (-1 = read all), epoch seen ('' = none),
#       epoch for a new version hash, decay epoch of the replica, decay epoch the pushed increments are in,
#       γ per decay epoch (1 = no discounting), n policy pairs, policy (field, incr)..., costs (field, incr)...
# An applied batch bumps the version and records it as the score of every field it touched
# (ZADD into the change index), so a reader asks for the fields changed after the version it
# has seen: the read costs what changed, not the size of the state. The version hash also
# holds a random epoch, set when it is created: if the keys expired or Redis lost them, the
# epoch differs from the one the reader saw, and it reads everything.
# The policy hash is decayed to the replica's decay epoch when it is behind (module docstring).
# Returns {policy (field, total)..., costs (field, total)..., rollout blob or false, applied, version, 1 if full, epoch,
#          decay epoch of the totals}.
_PUSH_AND_READ = """
redis.call('HSETNX', KEYS[7], 'epoch', ARGV[6])
local target = tonumber(ARGV[7])
local stamp = tonumber(ARGV[8])
local gamma = tonumber(ARGV[9])
local dfield = 'decay:' .. KEYS[2]
local de = tonumber(redis.call('HGET', KEYS[7], dfield) or '-1')
if gamma < 1 then
  if de < 0 then
    redis.call('HSET', KEYS[7], dfield, ARGV[7])
    de = target
  elseif target > de then
    local f = gamma ^ (target - de)
    local all = redis.call('HGETALL', KEYS[2])
    for j = 1, #all, 2 do
      if string.sub(all[j], 1, 1) ~= '~' then
        redis.call('HSET', KEYS[2], all[j], string.format('%.17g', tonumber(all[j + 1]) * f))
      end
    end
    redis.call('HSET', KEYS[7], dfield, ARGV[7])
    redis.call('HSET', KEYS[7], 'epoch', ARGV[6])
    de = target
  end
end
local scale = 1
if gamma < 1 and stamp < de then scale = gamma ^ (de - stamp) end
local seq = tonumber(ARGV[1])
local applied = 0
if seq > 0 then
  local done = tonumber(redis.call('GET', KEYS[1]) or '0')
  if seq > done then
    local ver = redis.call('HINCRBY', KEYS[7], 'v', 1)
    local np = tonumber(ARGV[10])
    local i = 11
    for _ = 1, np do
      local inc = ARGV[i + 1]
      if scale ~= 1 and string.sub(ARGV[i], 1, 1) ~= '~' then inc = string.format('%.17g', tonumber(inc) * scale) end
      redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], inc)
      redis.call('ZADD', KEYS[5], ver, ARGV[i])
      i = i + 2
    end
    while i <= #ARGV do
      redis.call('HINCRBYFLOAT', KEYS[3], ARGV[i], ARGV[i + 1])
      redis.call('ZADD', KEYS[6], ver, ARGV[i])
      i = i + 2
    end
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    applied = 1
  end
end
local ver = tonumber(redis.call('HGET', KEYS[7], 'v') or '0')
local epoch = redis.call('HGET', KEYS[7], 'epoch')
for _, k in ipairs({KEYS[2], KEYS[3], KEYS[5], KEYS[6], KEYS[7]}) do
  redis.call('PEXPIRE', k, ARGV[3])
end
local since = tonumber(ARGV[4])
local full = 0
if since < 0 or since > ver or epoch ~= ARGV[5] then full = 1 end
local function read(hash, index)
  if full == 1 then return redis.call('HGETALL', hash) end
  local out = {}
  if since == ver then return out end
  for _, f in ipairs(redis.call('ZRANGEBYSCORE', index, '(' .. since, '+inf')) do
    local v = redis.call('HGET', hash, f)
    if v then out[#out + 1] = f; out[#out + 1] = v end
  end
  return out
end
return {read(KEYS[2], KEYS[5]), read(KEYS[3], KEYS[6]), redis.call('GET', KEYS[4]) or false, applied, ver, full, epoch, tostring(de)}
"""
_DECODE_IN_THREAD = 2_000
"""Replies with more items than this are decoded in a thread (a full read after start or an outage)."""

Stats = dict[str, list[float]]


def add_into(into: Stats, delta: Mapping[str, list[float]]) -> Stats:
    """`into += delta`, component-wise per key."""
    for key, values in delta.items():
        cur = into.get(key)
        if cur is None:
            into[key] = [float(v) for v in values]
        else:
            if len(cur) < len(values):
                cur.extend([0.0] * (len(values) - len(cur)))
            for i, v in enumerate(values):
                cur[i] += float(v)
    return into


def to_fields(stats: Mapping[str, list[float]]) -> list[str]:
    """Flat ``field, increment, ...`` arguments; field = ``<stat key>#<component index>``."""
    out: list[str] = []
    for key, values in stats.items():
        if not all(math.isfinite(v) for v in values):
            log.warning("not sharing non-finite statistics for %r", key)
            continue
        for i, v in enumerate(values):
            out += [f"{key}#{i}", repr(float(v))]
    return out


def from_hash(raw: Any) -> Stats:
    """HGETALL reply (flat list from Lua, or a dict) -> {stat key: [components]}."""
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        items = list(zip(raw[0::2], raw[1::2]))
    parts: dict[str, dict[int, float]] = {}
    for field, value in items:
        name = field.decode() if isinstance(field, bytes) else str(field)
        key, _, index = name.rpartition("#")
        parts.setdefault(key, {})[int(index)] = float(value)
    out: Stats = {}
    for key, comps in parts.items():
        values = [0.0] * (max(comps) + 1)
        for i, v in comps.items():
            values[i] = v
        out[key] = values
    return out


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def digest(stats: Mapping[str, list[float]]) -> str:
    """Order-independent digest of statistics (equal digests = identical posteriors)."""
    payload = json.dumps(sorted((k, [repr(float(v)) for v in vs]) for k, vs in stats.items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class RolloutHolder(Protocol):
    """Whoever holds the live rollout controller (the decider): a state adopted from another replica goes there."""

    rollout: RolloutController


class SharedDecisionRegistry(DecisionRegistry):
    """`DecisionRegistry` that also queues every decision (and its outcome) for Redis."""

    def __init__(self, shared: SharedState, *, max_entries: int = 100_000, ttl_s: float = 86_400.0) -> None:
        super().__init__(max_entries=max_entries, ttl_s=ttl_s)
        self._shared = shared

    def register(self, decision: Decision) -> None:
        super().register(decision)
        self._shared.put_decision(decision, None)

    def complete(self, decision: Decision, outcome: Outcome) -> None:
        super().complete(decision, outcome)
        self._shared.put_decision(decision, outcome)


class SharedState:
    """Background sync of one runtime with Redis (see the module docstring)."""

    def __init__(
        self,
        store: RedisStore,
        *,
        storage: StorageSettings,
        policy: Policy,
        costs: BaselineCosts,
        rollout: RolloutHolder,
        registry: DecisionRegistry,
        max_pending_decisions: int = 50_000,
    ) -> None:
        st = storage
        self.policy = policy
        self.costs = costs
        self.rollout_holder = rollout
        self.store = store
        self.redis = store.redis
        self.interval_s = max(0.05, st.sync_interval_s)
        self.timeout_s = st.redis_timeout_s
        self.decision_ttl_ms = max(1, int(st.decision_ttl_s * 1000))
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        p = store.prefix
        self.policy_key = f"{p}policy:{policy.name}:{st.policy_family}"
        self.costs_key = f"{p}costs:{st.policy_family}"
        self.seq_key = f"{p}sync-seq:{self.replica_id}"
        # change index (zset: field -> version of its last change) per hash, and the version counter
        self.change_keys = (f"{self.policy_key}:changes", f"{self.costs_key}:changes")
        self.version_key = f"{p}state-version:{st.policy_family}"  # one per family: the costs hash is shared by policies
        self.state_ttl_ms = max(1, int(st.state_ttl_s * 1000))
        self._since = -1  # version of the last read; -1 = read everything next time
        self._epoch = ""  # epoch of the version hash that `_since` counts in
        self.changed_keys_read = 0
        self._costs_changed = True
        self._digest_cache: tuple[str, str, str] | None = None
        self.heartbeat_key = f"{p}replica:{self.replica_id}"
        self.decision_prefix = f"{p}decision:"
        self.registry = SharedDecisionRegistry(self, max_entries=registry.max_entries, ttl_s=registry.ttl_s)
        self._push = self.redis.register_script(_PUSH_AND_READ)
        # increments exported from the policy/costs but not yet acknowledged by Redis
        self._fresh: tuple[Stats, Stats] = ({}, {})
        self._fresh_epoch = 0  # decay epoch the policy increments in `_fresh` are expressed in
        self._inflight: tuple[int, Stats, Stats, int] | None = None
        self._seq = 0
        self._decisions: asyncio.Queue[_DecisionRecord] | None = None
        self._max_pending_decisions = max_pending_decisions
        self._remote_rollout: bytes | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.connected = False
        self._down_logged = False
        self.last_sync_at: float | None = None
        self.syncs = 0
        self.sync_failures = 0
        self.decisions_written = 0
        self.decisions_dropped = 0
        self.rollout_reloads = 0

    # ---- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """First sync (so the replica starts from the merged posterior), then the background tasks."""
        self._decisions = asyncio.Queue(self._max_pending_decisions)
        try:
            await self._publish_startup_rollout()
            await self.sync_once()
        except Exception as exc:  # noqa: BLE001 - start with local state; the loop keeps trying
            self._went_down(exc)
        self._tasks = [
            asyncio.create_task(self._sync_forever(), name="thermostat-shared-sync"),
            asyncio.create_task(self._listen_forever(), name="thermostat-shared-listen"),
            asyncio.create_task(self._write_decisions_forever(), name="thermostat-shared-decisions"),
        ]

    async def stop(self, *, flush_s: float = 2.0) -> None:
        """Stop the tasks, then push what is pending (bounded by `flush_s`) and close."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110 - stopping: its outcome no longer matters
                pass
        self._tasks = []
        try:
            async with asyncio.timeout(flush_s):
                await self._flush_decisions()
                await self.sync_once()
        except Exception as exc:  # noqa: BLE001
            log.warning("shared state: final sync with redis failed (%s); pending increments dropped", exc)
        try:
            await self.redis.delete(self.heartbeat_key)
            await self.store.aclose()
        except Exception as exc:  # noqa: BLE001
            log.debug("closing the redis client: %s", exc)

    def _went_down(self, exc: BaseException) -> None:
        self.connected = False
        self._since = -1  # Redis may have lost or expired state meanwhile: read all of it again
        self.sync_failures += 1
        if not self._down_logged:
            self._down_logged = True
            log.warning("redis unreachable (%s: %s): keeping local state and retrying", type(exc).__name__, exc)

    def _came_back(self) -> None:
        if self._down_logged:
            log.warning("redis reachable again: pending increments pushed, state resynced")
        self._down_logged = False
        self.connected = True

    # ---- policy statistics + rollout poll ---------------------------------------

    async def sync_once(self) -> None:
        """One push-and-read round trip; raises on Redis errors (the loop handles them).

        Reads only the fields changed since the version seen last (all of them on the first
        sync and after an outage), so an idle replica with a large state does O(1) work.
        """
        if self.store.unsaved:
            await self.store.replay_unsaved()
        adaptive = self.policy if isinstance(self.policy, Adaptive) and self.policy.discount.enabled else None
        decay_epoch = adaptive.decay_epoch if adaptive is not None else 0
        gamma = adaptive.discount.gamma if adaptive is not None else 1.0
        delta_pol, delta_costs = self.policy.export_delta(), self.costs.export_delta()
        if adaptive is not None and decay_epoch > self._fresh_epoch:
            # increments exported before a boundary, still waiting: in the epoch of the new ones
            factor = adaptive.discount.factor(decay_epoch - self._fresh_epoch)
            for key, values in self._fresh[0].items():
                if not key.startswith(RESERVED_PREFIX):
                    values[:] = [v * factor for v in values]
        self._fresh_epoch = decay_epoch
        add_into(self._fresh[0], delta_pol)
        add_into(self._fresh[1], delta_costs)
        if self._inflight is None and (self._fresh[0] or self._fresh[1]):
            self._seq += 1
            self._inflight = (self._seq, *self._fresh, self._fresh_epoch)
            self._fresh = ({}, {})
        if self._inflight is not None:
            seq, pol, costs, stamp = self._inflight
            pol_fields, cost_fields = to_fields(pol), to_fields(costs)
        else:
            seq, pol_fields, cost_fields, stamp = 0, [], [], decay_epoch
        args: list[Any] = [
            seq, 86_400_000, self.state_ttl_ms, self._since, self._epoch, uuid.uuid4().hex, decay_epoch, stamp, repr(gamma),
            len(pol_fields) // 2, *pol_fields, *cost_fields,
        ]
        keys = [self.seq_key, self.policy_key, self.costs_key, self.store.k(STATE_KEY), *self.change_keys, self.version_key]
        async with asyncio.timeout(self.timeout_s * 2):
            pol_raw, costs_raw, rollout_raw, _applied, version, full, epoch, store_decay = await self._push(keys=keys, args=args)
        if seq:
            self._inflight = None
        if adaptive is not None:
            # the totals are in the store's decay epoch (>= ours unless discounting was just switched on)
            adaptive.advance(int(float(store_decay)))
        if len(pol_raw) + len(costs_raw) > _DECODE_IN_THREAD:
            pol_totals, cost_totals = await asyncio.to_thread(lambda: (from_hash(pol_raw), from_hash(costs_raw)))
        else:
            pol_totals, cost_totals = from_hash(pol_raw), from_hash(costs_raw)
        if full:
            self.policy.load_totals(pol_totals)
            self.costs.load_totals(cost_totals)
        else:
            self.policy.load_changed(pol_totals)
            self.costs.load_changed(cost_totals)
        self._since = int(version)
        self._epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        self.changed_keys_read = len(pol_totals) + len(cost_totals)
        if full or delta_costs or cost_totals:
            self._costs_changed = True
        self._came_back()
        self.last_sync_at = time.time()
        self.syncs += 1
        if rollout_raw is not None:
            self._adopt_rollout(_as_bytes(rollout_raw))
        await self._heartbeat()

    async def _digests(self) -> tuple[str, str]:
        """Digests of the posterior and the costs, recomputed only when they changed.

        The snapshot is taken on the loop (the policy is not thread-safe); the hashing,
        which grows with the state, runs in a thread.
        """
        version = self.policy.version
        if self._digest_cache is None or self._digest_cache[0] != version or self._costs_changed:
            snap, costs = self.policy.snapshot(), {k: list(v) for k, v in self.costs.totals.items()}
            self._costs_changed = False
            pair = await asyncio.to_thread(lambda: (digest(snap), digest(costs)))
            self._digest_cache = (version, *pair)
        return self._digest_cache[1], self._digest_cache[2]

    async def _heartbeat(self) -> None:
        state = self.rollout_holder.rollout.state
        policy_digest, costs_digest = await self._digests()
        body = {
            "replica": self.replica_id,
            "policy": self.policy.name,
            "digest": policy_digest,
            "costs_digest": costs_digest,
            "phase": state.phase,
            "rolled_back": bool(state.rollback.active),
            "synced_at": self.last_sync_at,
        }
        ttl_ms = int(max(3.0, 5 * self.interval_s) * 1000)
        await self.redis.set(self.heartbeat_key, json.dumps(body), px=ttl_ms)

    async def _sync_forever(self) -> None:
        backoff = 0.0
        while True:
            await asyncio.sleep(self.interval_s if backoff == 0.0 else backoff)
            try:
                await self.sync_once()
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never let the loop die
                self._went_down(exc)
                backoff = min(5.0, max(0.25, backoff * 2))

    def pending(self) -> int:
        """Statistic keys exported locally but not yet acknowledged by Redis."""
        inflight = 0 if self._inflight is None else len(self._inflight[1]) + len(self._inflight[2])
        return inflight + len(self._fresh[0]) + len(self._fresh[1])

    # ---- rollout ----------------------------------------------------------------

    async def _publish_startup_rollout(self) -> None:
        """At start the runtime has loaded the stored state and applied the configuration
        to it (a changed phase or `enabled`); if that changed anything, this replica's
        state is the newest and is stored (and announced) for the others."""
        async with asyncio.timeout(self.timeout_s * 2):
            raw = await self.redis.get(self.store.k(STATE_KEY))
            local = msgspec.json.encode(self.rollout_holder.rollout.state)
            if raw is None or _as_bytes(raw) != local:
                await self.store.set(STATE_KEY, local)
        self._remote_rollout = local

    def _adopt_rollout(self, raw: bytes) -> None:
        """Swap a rollout state written by another replica into the decider's `rollout.state`."""
        if raw == self._remote_rollout:
            return
        self._remote_rollout = raw
        if raw == self.store.last_written.get(STATE_KEY):
            return  # our own write
        rollout = self.rollout_holder.rollout
        if raw == msgspec.json.encode(rollout.state):
            return
        try:
            state = msgspec.json.decode(raw, type=RolloutState)
        except msgspec.DecodeError:
            log.exception("ignoring an undecodable rollout state in redis")
            return
        rollout.state = state
        self.rollout_reloads += 1
        log.warning(
            "rollout state taken from another replica: phase %s%s",
            state.phase,
            f", rolled back ({state.rollback.trigger}: {state.rollback.reason})" if state.rollback.active else "",
        )

    async def refresh_rollout(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            raw = await self.redis.get(self.store.k(STATE_KEY))
        if raw is not None:
            self._adopt_rollout(_as_bytes(raw))

    async def _listen_forever(self) -> None:
        backoff = 0.25
        channel = self.store.changes_channel
        state_key = STATE_KEY.encode()
        me = self.store.instance_id.encode()
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                await self.refresh_rollout()  # whatever was published while we were not listening
                backoff = 0.25
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    sender, _, key = bytes(msg["data"]).partition(b"\n")
                    if sender != me and key == state_key:
                        await self.refresh_rollout()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect with backoff
                log.debug("shared state listener reconnecting after %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            finally:
                try:
                    await asyncio.shield(pubsub.aclose())
                except BaseException as exc:  # noqa: BLE001 - a dead connection may not close cleanly
                    log.debug("closing the pub/sub connection: %s", exc)

    # ---- decisions --------------------------------------------------------------

    def put_decision(self, decision: Decision, outcome: Outcome | None) -> None:
        """Queue a decision (and its outcome, if complete) for Redis. Never blocks, never raises."""
        q = self._decisions
        if q is None or self._stopping:
            return
        try:
            q.put_nowait((decision, outcome))
        except asyncio.QueueFull:
            try:  # keep the newest: feedback usually concerns recent requests
                q.get_nowait()
                q.put_nowait((decision, outcome))
            except (asyncio.QueueEmpty, asyncio.QueueFull):
                pass
            self.decisions_dropped += 1

    def _take_batch(self, first: _DecisionRecord | None, limit: int = 1000) -> dict[str, _DecisionRecord]:
        q = self._decisions
        batch: dict[str, _DecisionRecord] = {}
        if first is not None:
            batch[first[0].request_id] = first
        while q is not None and not q.empty() and len(batch) < limit:
            item = q.get_nowait()
            batch[item[0].request_id] = item  # a completion replaces the bare decision
        return batch

    async def _write_batch(self, batch: dict[str, _DecisionRecord]) -> None:
        async with asyncio.timeout(self.timeout_s * 2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id, record in batch.items():
                    pipe.set(self.decision_prefix + request_id, _encode(record), px=self.decision_ttl_ms)
                await pipe.execute()
        self.decisions_written += len(batch)

    async def _write_decisions_forever(self) -> None:
        assert self._decisions is not None
        backoff = 0.0
        while True:
            first = await self._decisions.get()
            batch = self._take_batch(first)
            while True:
                try:
                    await self._write_batch(batch)
                    backoff = 0.0
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep the batch, retry with backoff
                    self._went_down(exc)
                    backoff = min(5.0, max(0.25, backoff * 2))
                    await asyncio.sleep(backoff)
                    batch.update(self._take_batch(None, limit=1000))  # newer records replace older ones

    async def _flush_decisions(self) -> None:
        while self._decisions is not None and not self._decisions.empty():
            await self._write_batch(self._take_batch(None))

    async def find_decision(self, request_id: str) -> tuple[Decision, Outcome | None] | None:
        """The decision (and outcome, if known) of `request_id`, made by any replica; None if unknown.

        Looks in this replica's registry, then in Redis. Never raises: Redis errors count as unknown.
        """
        local = self.registry.get(request_id, time.time())
        if local is not None:
            return local
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self.redis.get(self.decision_prefix + request_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("looking up decision %s in redis failed: %s", request_id, exc)
            return None
        if raw is None:
            return None
        try:
            return _decode_record(_as_bytes(raw))
        except msgspec.DecodeError:
            log.exception("undecodable decision record for %s", request_id)
            return None

    # ---- status -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "connected": self.connected,
            "last_sync_at": self.last_sync_at,
            "syncs": self.syncs,
            "sync_failures": self.sync_failures,
            "pending_stat_keys": self.pending(),
            "pending_decisions": self._decisions.qsize() if self._decisions is not None else 0,
            "decisions_written": self.decisions_written,
            "decisions_dropped": self.decisions_dropped,
            "rollout_reloads": self.rollout_reloads,
            "state_version": self._since,
            "changed_keys_read": self.changed_keys_read,
        }
