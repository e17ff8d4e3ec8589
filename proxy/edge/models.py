"""`GET /v1/models` when no upstream is the default: one list merged from every upstream.

With a `*` upstream the request is simply forwarded there. Without one, a client (or an
SDK's model picker) would otherwise see only whatever upstream its request happened to
route to, so the `data` lists of every OpenAI-format upstream are fetched concurrently,
merged in configuration order (the first upstream to list an id wins, which is also how
`UpstreamPool.route` sends that id), and cached for `ttl_s`. An upstream that fails is
left out and logged; only when every one fails does the client get a 502.
`GET /v1/models/{id}` needs no merging: it routes by the id like any model name.

The cache is keyed by the credentials the upstreams would receive (a hash, never the
value), because without `api_key_env` each client's own key decides what it may list.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from proxy.common import ProxyError
from proxy.edge.upstream import UPSTREAM_ERRORS, Upstream, UpstreamPool, forward_headers

log = logging.getLogger("thermostat.edge.models")

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", b"api-key", b"openai-organization", b"openai-project")


class _Failed(Exception):
    """One upstream's list could not be used (reason in the message, for the log)."""


def credential_key(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """A digest of the client's credential headers (the cache must not serve one client's list to another)."""
    digest = hashlib.sha256()
    for name, value in headers:
        if name.lower() in _CREDENTIAL_HEADERS:
            digest.update(name.lower() + b"\0" + value + b"\0")
    return digest.hexdigest()


class ModelCatalog:
    """The merged `/v1/models` body, cached per credential digest for `ttl_s` seconds."""

    def __init__(self, pool: UpstreamPool, ttl_s: float = 10.0, max_entries: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._inflight: dict[str, asyncio.Future[bytes]] = {}

    @property
    def upstreams(self) -> list[Upstream]:
        return [u for u in self.pool.upstreams if u.format == "openai" and u.paths.allows("GET", "/models")]

    def needed(self) -> bool:
        """True when `/v1/models` should be merged here rather than forwarded to the default upstream."""
        return self.pool.default is None

    async def body(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The merged list as JSON bytes; ProxyError(502) when no upstream answered."""
        key = credential_key(headers)
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        pending = self._inflight.get(key)
        if pending is not None:  # concurrent misses share one round of upstream requests
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            body = await self._merge(headers)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(body)
        if len(self._cache) >= self.max_entries:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (self.clock(), body)
        return body

    async def _merge(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        upstreams = self.upstreams
        results = await asyncio.gather(*(self._fetch(u, headers) for u in upstreams), return_exceptions=True)
        data: list[Any] = []
        seen: set[str] = set()
        failures: list[str] = []
        for upstream, result in zip(upstreams, results):
            if isinstance(result, BaseException):
                reason = str(result) if isinstance(result, _Failed) else type(result).__name__
                log.warning("upstream '%s' left out of the merged /v1/models: %s", upstream.name, reason)
                failures.append(f"{upstream.name}: {reason}")
                continue
            for entry in result:
                ident = entry.get("id") if isinstance(entry, dict) else None
                if isinstance(ident, str) and ident not in seen:
                    seen.add(ident)
                    data.append(entry)
        if upstreams and len(failures) == len(upstreams):
            raise ProxyError(502, "no upstream answered /v1/models (" + "; ".join(failures) + ")", "upstream_unreachable", "upstream_error")
        if not upstreams:
            raise ProxyError(404, "no OpenAI-format upstream serves /v1/models", "model_not_found")
        return _encode({"object": "list", "data": data})

    async def _fetch(self, upstream: Upstream, headers: list[tuple[bytes, bytes]]) -> list[Any]:
        url = upstream.url_for("/models", b"")
        try:
            response = await asyncio.wait_for(upstream.send("GET", url, forward_headers(headers, upstream), None), upstream.settings.timeout_s)
        except UPSTREAM_ERRORS as exc:
            raise _Failed(type(exc).__name__) from exc
        try:
            if response.status != 200:
                raise _Failed(f"HTTP {response.status}")
            raw = await asyncio.wait_for(_read_capped(response, upstream.settings.max_response_bytes), upstream.settings.timeout_s)
        except UPSTREAM_ERRORS as exc:
            raise _Failed(type(exc).__name__) from exc
        finally:
            response.release()
        try:
            doc = _decode(raw)
        except msgspec.DecodeError:
            raise _Failed("the body is not JSON") from None
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise _Failed("the body has no 'data' list")
        return data


async def _read_capped(response: Any, cap: int) -> bytes:
    """The whole body, or _Failed past `cap` bytes (a model list is small; anything larger is wrong)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise _Failed(f"the body exceeds {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
