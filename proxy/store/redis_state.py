"""`StateStore` over Redis: the guards' shared state for several Thermostat replicas.

Same semantics as `guards.state.InProcessStore` (tests/shared/test_redis_store.py runs
the same scenarios against both), with one Redis round trip per guard call:

Budget keys
    One hash per budget key, fields ``used``, ``reserved``, ``overruns`` (integers,
    changed with HINCRBY) and ``exp`` (the caller's ``expires_at``, unix seconds).
    `budget_reserve`, `budget_settle` and `budget_release` are one Lua script each
    (EVALSHA; redis-py reloads the script after a SCRIPT FLUSH or a restart), so the
    choice among the candidates happens inside Redis's atomic step: N replicas
    never act on a stale read and never overspend.

    Expiry is enforced twice, exactly like the in-process store: a key whose ``exp``
    is ``<= now`` counts as absent (reset on the next write), and Redis drops the key
    itself with ``PEXPIRE (max(exp) - now)``. That is PEXPIREAT(expires_at) measured on
    the caller's clock rather than on Redis's: the window keys embed the proxies'
    window start, so the proxies' clock is the one that decides when a window is over
    (a Redis host whose clock drifts does not shorten or stretch windows), and an
    injected clock (tests) behaves like a real one.

Leases
    `budget_lease` is one Lua script too: the lease amounts are part of the budget
    key's ``reserved``, and a second hash (``<budget key>:leases``, same expiry) keeps
    per holder its amount, cumulative reported usage and overruns, and expiry. Expired
    leases of other holders are reclaimed inside the same atomic step.

Blobs, counters, maps
    GET/SET, INCRBY, HSET/HGETALL/HDEL. Every blob `set` is announced on the pub/sub
    channel ``<prefix>changes`` (message ``<instance id>\\n<key>``) in the same
    MULTI as the SET, so other replicas reload it at once (`proxy.learning.sync` listens).
    A blob `set` that fails is remembered (`unsaved`) so the shared-state task can
    write it once Redis is back; the call still raises `StoreUnavailable`.

Failures
    Connection errors and Redis timeouts become `guards.state.StoreUnavailable`; the
    guards turn that into their fail-safe verdicts. The connection pool is bounded
    (`max_connections`; waiting for a free connection is bounded by the timeout), and
    a command that fails on a dead connection is retried once on a new one (CLIENT
    KILL, a Redis restart).

Every key starts with `prefix`, so several deployments (or tests) can share a Redis.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from guards.state import BudgetKey, Candidate, Counters, LeaseCall, LeaseGrant, ReserveResult, StoreUnavailable

REDIS_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
"""What a Redis call raises when the server cannot be reached in time (the callers fail safe on it)."""

# Shared Lua helpers: a key is live when its `exp` field is after `now`. A dead key is
# deleted before it is written again, so a new window starts from zero. `touch` keeps
# the later of the stored and the given expiry and sets the Redis TTL to match.
_LUA_COMMON = """
local function live(k, now)
  local e = redis.call('HGET', k, 'exp')
  if e and tonumber(e) > now then return true end
  if e then redis.call('DEL', k) end
  return false
end
local function counters(k, now)
  if not live(k, now) then return 0, 0, 0 end
  local v = redis.call('HMGET', k, 'used', 'reserved', 'overruns')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
end
local function touch(k, now, exp_arg)
  local new = tonumber(exp_arg)
  local cur = tonumber(redis.call('HGET', k, 'exp'))
  if cur and cur > new then new = cur; exp_arg = redis.call('HGET', k, 'exp') end
  local ms = math.ceil((new - now) * 1000)
  if ms <= 0 then redis.call('DEL', k); return end
  redis.call('HSET', k, 'exp', exp_arg)
  redis.call('PEXPIRE', k, ms)
end
"""

# KEYS: budget keys. ARGV: now, expires_at, n_candidates, then per key (limit, gate, floor),
# then per candidate (tokens, gated 0/1, force 0/1). A key's `used` is first raised to its
# floor (see guards/state.py).
# Returns {index or -1, overrun 0/1, before (3 per key)..., after (3 per key)...}.
_RESERVE = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local n = #KEYS
local m = tonumber(ARGV[3])
local used, res, ovr, limit, gate = {}, {}, {}, {}, {}
local gated_refused = false
local out = {-1, 0}
for i = 1, n do
  used[i], res[i], ovr[i] = counters(KEYS[i], now)
  limit[i] = tonumber(ARGV[3 + 3 * i - 2])
  gate[i] = tonumber(ARGV[3 + 3 * i - 1])
  local floor = tonumber(ARGV[3 + 3 * i])
  if used[i] < floor then
    used[i] = floor
    redis.call('HSET', KEYS[i], 'used', floor)
    touch(KEYS[i], now, ARGV[2])
  end
  if used[i] + res[i] >= gate[i] then gated_refused = true end
  out[#out + 1] = used[i]; out[#out + 1] = res[i]; out[#out + 1] = ovr[i]
end
local base = 3 + 3 * n
for c = 0, m - 1 do
  local tokens = tonumber(ARGV[base + 3 * c + 1])
  local gated = ARGV[base + 3 * c + 2] == '1'
  local force = ARGV[base + 3 * c + 3] == '1'
  if not (gated and gated_refused) then
    local any_over = false
    local over = {}
    for i = 1, n do
      over[i] = used[i] + res[i] + tokens > limit[i]
      if over[i] then any_over = true end
    end
    if force or not any_over then
      for i = 1, n do
        redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[base + 3 * c + 1])
        res[i] = res[i] + tokens
        if over[i] then
          redis.call('HINCRBY', KEYS[i], 'overruns', 1)
          ovr[i] = ovr[i] + 1
        end
        touch(KEYS[i], now, ARGV[2])
      end
      out[1] = c
      if any_over then out[2] = 1 end
      for i = 1, n do
        out[#out + 1] = used[i]; out[#out + 1] = res[i]; out[#out + 1] = ovr[i]
      end
      return out
    end
  end
end
for i = 1, n do
  out[#out + 1] = used[i]; out[#out + 1] = res[i]; out[#out + 1] = ovr[i]
end
return out
"""
)

# KEYS: budget keys. ARGV: now, expires_at, reserved, actual.
_SETTLE = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local reserved = tonumber(ARGV[3])
for i = 1, #KEYS do
  local k = KEYS[i]
  local _, r, _ = counters(k, now)
  local dec = math.min(r, reserved)
  if dec > 0 then redis.call('HINCRBY', k, 'reserved', -dec) end
  redis.call('HINCRBY', k, 'used', ARGV[4])
  touch(k, now, ARGV[2])
end
return 1
"""
)

# KEYS: budget keys. ARGV: now, reserved. Dead or absent keys are left alone.
_RELEASE = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local reserved = tonumber(ARGV[2])
for i = 1, #KEYS do
  local k = KEYS[i]
  if live(k, now) then
    local r = tonumber(redis.call('HGET', k, 'reserved')) or 0
    local dec = math.min(r, reserved)
    if dec > 0 then redis.call('HINCRBY', k, 'reserved', -dec) end
  end
end
return 1
"""
)

# KEYS: budget key, its lease hash. ARGV: now, expires_at, holder, limit, used_total,
# overruns_total, target, min_amount, lease_expires_at, seq, held, known 0/1, seen_used,
# acked_used, claim, valid_s. The lease hash has per holder <holder>:a (amount, counted in
# the key's `reserved`), :u and :o (cumulative usage and overruns reported), :e (expiry),
# :s (last call sequence applied), :h (reservations in flight at that call), :c (of
# those, charged as used when its lease was reclaimed). The key's own fields `rb`, `gm`,
# `gs` hold a rebuild after lost state (see guards/state.py): until when nothing new is
# granted, the largest `used` a re-adopted holder had seen, their acknowledged usage.
# Returns {amount, used, reserved, overruns, rebuilding 0/1}.
_LEASE = (
    _LUA_COMMON
    + """
local now = tonumber(ARGV[1])
local k, lk, me = KEYS[1], KEYS[2], ARGV[3]
if not live(k, now) then redis.call('DEL', lk) end
local kv = redis.call('HMGET', k, 'used', 'reserved', 'overruns', 'rb', 'gm', 'gs')
local used, res, ovr = tonumber(kv[1]) or 0, tonumber(kv[2]) or 0, tonumber(kv[3]) or 0
local rb, gm, gs = tonumber(kv[4]), tonumber(kv[5]) or 0, tonumber(kv[6]) or 0
local flat = redis.call('HGETALL', lk)
local rec = {}
for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
for i = 1, #flat, 2 do
  local f = flat[i]
  if string.sub(f, -2) == ':a' then
    local h = string.sub(f, 1, -3)
    local amt = tonumber(flat[i + 1]) or 0
    local exp = tonumber(rec[h .. ':e']) or 0
    if h ~= me and amt > 0 and exp <= now then
      local charge = math.min(amt, tonumber(rec[h .. ':h']) or 0)
      res = math.max(0, res - amt)
      used = used + charge
      redis.call('HSET', lk, f, 0, h .. ':c', (tonumber(rec[h .. ':c']) or 0) + charge)
    end
  end
end
local limit, ut, ot = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local target, minimum = tonumber(ARGV[7]), tonumber(ARGV[8])
local seq, held, known = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12] == '1'
local a, u, o, s, c = 0, 0, 0, 0, 0
local stale = false
if rec[me .. ':e'] == nil then
  if known then
    if not rb then
      rb = now + tonumber(ARGV[16])
      redis.call('HSET', k, 'rb', rb)
    end
    local before = math.max(0, gm - gs)
    gm = math.max(gm, tonumber(ARGV[13]))
    gs = gs + tonumber(ARGV[14])
    used = used + tonumber(ARGV[14]) + math.max(0, gm - gs) - before
    u = tonumber(ARGV[14])
    if now < rb then
      a = math.min(tonumber(ARGV[15]), limit)
      res = res + a
    end
    redis.call('HSET', k, 'gm', gm, 'gs', gs)
  end
else
  a, u, o = tonumber(rec[me .. ':a']) or 0, tonumber(rec[me .. ':u']) or 0, tonumber(rec[me .. ':o']) or 0
  s, c = tonumber(rec[me .. ':s']) or 0, tonumber(rec[me .. ':c']) or 0
  stale = seq > 0 and seq <= s
end
local rebuilding = rb ~= nil and now < rb
if not stale then
  if c > 0 then used = math.max(0, used - c); c = 0 end
  local d = math.max(0, ut - u)
  used = used + d
  local taken = math.min(a, d)
  a = a - taken
  res = math.max(0, res - taken)
  ovr = ovr + math.max(0, ot - o)
  if target > a then
    if not rebuilding then
      local grant = math.min(target - a, math.max(0, limit - used - res))
      if a + grant >= minimum then a = a + grant; res = res + grant end
    end
  elseif target < a then
    res = math.max(0, res - (a - target))
    a = target
  end
  redis.call('HSET', lk, me .. ':a', a, me .. ':u', math.max(u, ut), me .. ':o', math.max(o, ot), me .. ':e', ARGV[9],
    me .. ':s', math.max(s, seq), me .. ':h', held, me .. ':c', c)
end
redis.call('HSET', k, 'used', used, 'reserved', res, 'overruns', ovr)
touch(k, now, ARGV[2])
touch(lk, now, ARGV[2])
return {a, used, res, ovr, rebuilding and 1 or 0}
"""
)


def client_name_for(prefix: str) -> str:
    """Connection name shown by CLIENT LIST: ``thermostat:<prefix>`` (no spaces allowed)."""
    return "thermostat:" + "".join(ch if ch.isprintable() and not ch.isspace() else "_" for ch in prefix)


def make_client(url: str, *, timeout_s: float = 1.0, max_connections: int = 64, client_name: str | None = None) -> aioredis.Redis:
    """A redis-py asyncio client with a bounded pool, short timeouts and one quick retry."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
        client_name=client_name,
    )
    return aioredis.Redis(connection_pool=pool)


def _num(value: float) -> str:
    return repr(float(value))


class RedisStore:
    """`guards.state.StateStore` over Redis (see the module docstring)."""

    def __init__(
        self,
        url: str = "",
        *,
        prefix: str = "thermostat:",
        timeout_s: float = 1.0,
        max_connections: int = 64,
        client: aioredis.Redis | None = None,
    ) -> None:
        if client is None and not url:
            raise ValueError("RedisStore needs a redis_url or a client")
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.redis: aioredis.Redis = (
            client
            if client is not None
            else make_client(url, timeout_s=timeout_s, max_connections=max_connections, client_name=client_name_for(prefix))
        )
        self.instance_id = uuid.uuid4().hex
        self.changes_channel = f"{prefix}changes"
        self.last_written: dict[str, bytes] = {}  # blob key -> what this process last stored
        self.unsaved: dict[str, bytes] = {}  # blob writes that failed, for `replay_unsaved`
        self._reserve = self.redis.register_script(_RESERVE)
        self._settle = self.redis.register_script(_SETTLE)
        self._release = self.redis.register_script(_RELEASE)
        self._lease = self.redis.register_script(_LEASE)

    def k(self, key: str) -> str:
        """The Redis key of a store key."""
        return self.prefix + key

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except REDIS_UNAVAILABLE:
            return False

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except REDIS_UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    # ---- budget -----------------------------------------------------------------

    async def budget_reserve(
        self,
        keys: Sequence[BudgetKey],
        candidates: Sequence[Candidate],
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        args: list[Any] = [_num(now), _num(expires_at), len(candidates)]
        for key in keys:
            args += [int(key.limit), int(key.gate), int(key.floor)]
        for cand in candidates:
            args += [int(cand.tokens), 1 if cand.gated else 0, 1 if cand.force else 0]
        raw = await self._call(self._reserve(keys=[self.k(key.key) for key in keys], args=args))
        values = [int(v) for v in raw]
        n = len(keys)
        before = tuple(Counters(*values[2 + 3 * i : 5 + 3 * i]) for i in range(n))
        after = tuple(Counters(*values[2 + 3 * (n + i) : 5 + 3 * (n + i)]) for i in range(n))
        index = values[0] if values[0] >= 0 else None
        if index is None:
            return ReserveResult(index=None, before=before, after=before)
        return ReserveResult(index=index, before=before, after=after, overrun=bool(values[1]))

    async def budget_settle(self, keys: Sequence[str], reserved: int, actual: int, *, now: float, expires_at: float) -> None:
        await self._call(self._settle(keys=[self.k(key) for key in keys], args=[_num(now), _num(expires_at), int(reserved), int(actual)]))

    async def budget_release(self, keys: Sequence[str], reserved: int, *, now: float) -> None:
        await self._call(self._release(keys=[self.k(key) for key in keys], args=[_num(now), int(reserved)]))

    async def budget_read(self, keys: Sequence[str], *, now: float) -> tuple[Counters, ...]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(self.k(key), "used", "reserved", "overruns", "exp")
            rows = await self._call(pipe.execute())
        out = []
        for used, reserved, overruns, exp in rows:
            if exp is None or float(exp) <= now:
                out.append(Counters())
            else:
                out.append(Counters(int(used or 0), int(reserved or 0), int(overruns or 0)))
        return tuple(out)

    async def budget_lease(self, call: LeaseCall, *, now: float) -> LeaseGrant:
        args: list[Any] = [
            _num(now), _num(call.expires_at), call.holder, int(call.limit), int(call.used_total), int(call.overruns_total),
            int(call.target), int(call.min_amount), _num(call.lease_expires_at), int(call.seq), int(call.held),
            1 if call.known else 0, int(call.seen_used), int(call.acked_used), int(call.claim), _num(call.valid_s),
        ]
        raw = await self._call(self._lease(keys=[self.k(call.key), self.k(call.key) + ":leases"], args=args))
        amount, used, reserved, overruns, rebuilding = (int(v) for v in raw)
        return LeaseGrant(amount=amount, counters=Counters(used, reserved, overruns), rebuilding=bool(rebuilding))

    # ---- blobs, counters, maps --------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        value = await self._call(self.redis.get(self.k(key)))
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.k(key), value)
                pipe.publish(self.changes_channel, f"{self.instance_id}\n{key}")
                await pipe.execute()
        except REDIS_UNAVAILABLE as exc:
            self.unsaved[key] = value
            raise StoreUnavailable(f"redis: {exc}") from exc
        self.unsaved.pop(key, None)
        self.last_written[key] = value

    async def replay_unsaved(self) -> int:
        """Write blobs whose `set` failed while Redis was away; returns how many were written."""
        done = 0
        for key, value in list(self.unsaved.items()):
            if self.unsaved.get(key) is value:
                await self.set(key, value)
                done += 1
        return done

    async def incr(self, key: str, amount: int = 1) -> int:
        return int(await self._call(self.redis.incrby(self.k(key), amount)))

    async def map_put(self, key: str, field: str, value: bytes) -> None:
        await self._call(self.redis.hset(self.k(key), field, value))

    async def map_get_all(self, key: str) -> dict[str, bytes]:
        raw = await self._call(self.redis.hgetall(self.k(key)))
        return {(f.decode() if isinstance(f, bytes) else str(f)): bytes(v) for f, v in raw.items()}

    async def map_delete(self, key: str, field: str) -> bool:
        return bool(await self._call(self.redis.hdel(self.k(key), field)))
