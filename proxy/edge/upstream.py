"""Upstreams: routing by model, one pooled aiohttp session each, and safe retries.

Measured here (bench/README.md): httpx's own pool collapses under concurrency, and
even on the aiohttp transport (`httpx-aiohttp`) the httpx layer (URL parsing, header
models, cookie extraction) was the largest share of Thermostat's CPU per request. The
edge therefore talks to aiohttp directly: one `ClientSession` per upstream with a
keep-alive pool, raw header lists relayed without decoding, bodies never decompressed
(`accept-encoding: identity` is asked; a body that comes compressed anyway is relayed
as it came).

Retries happen only when the connection could not be made (no byte reached the
upstream), bounded and with jittered backoff: a POST that may have reached the model
is never sent twice. The first attempt runs without any retry machinery.

The bytes travel through a `Transport` (like httpx's `transport=`): the default is
`AiohttpTransport`; tests pass one that answers from memory, so the edge can be driven
end to end without a socket.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
from collections.abc import AsyncIterator, Iterable
from typing import Literal, Protocol

import aiohttp
from multidict import CIMultiDict
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from proxy.common import PathFilter, bad_request, url_within_base
from proxy.config import ModelSettings, UpstreamSettings, find_model_settings

ErrorClass = Literal["timeout", "connect", "protocol"]

# Model names remembered per upstream (settings) and per pool (route, format): a client can send any
# name, so past this many the lookup is made again instead of remembered.
MAX_CACHED_NAMES = 4096

# aiohttp would otherwise add its own User-Agent, Accept and Content-Type to requests
# whose client did not send them: a proxy forwards what it got.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Content-Type", "Accept-Encoding"})


class ResponseBody(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]:
        """Chunks as they arrive (aiohttp's `StreamReader.iter_any`)."""
        ...


class UpstreamResponse(Protocol):
    """What the edge reads from an upstream response: the subset of `aiohttp.ClientResponse` it uses."""

    @property
    def status(self) -> int: ...

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> ResponseBody: ...

    def release(self) -> object:
        """The body was read to the end: the connection may be reused."""
        ...

    def close(self) -> None:
        """Cut short: drop the connection so the upstream stops generating."""
        ...


class Transport(Protocol):
    """Sends one request; the response body is not read yet."""

    async def send(self, method: str, url: str, headers: CIMultiDict[str], body: bytes | None) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


# aiohttp stops reading an upstream's socket once twice this much is buffered and unread.
# Its default (256 KiB since 3.10) let one stalled client's stream hold ~0.5 MiB in the
# relay's read buffer alone; SSE events are small, so 64 KiB costs nothing in throughput.
READ_BUFSIZE = 64 * 1024


class AiohttpTransport:
    """One pooled `ClientSession` (created on first use, inside the loop)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.max_connections, keepalive_timeout=30, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                cookie_jar=aiohttp.DummyCookieJar(),
                read_bufsize=READ_BUFSIZE,
            )
        return self._session

    async def send(self, method: str, url: str, headers: CIMultiDict[str], body: bytes | None) -> aiohttp.ClientResponse:
        return await self.session.request(method, url, headers=headers, data=body, allow_redirects=False)

    def hand_over_read_timeout(self, response: UpstreamResponse) -> aiohttp.StreamReader | None:
        """Stop aiohttp's per-read timer for the rest of this response and return its body, which
        proxy/edge/read_watch.py then fails on silence. The timer armed by the last read still
        runs until the next one."""
        if not isinstance(response, aiohttp.ClientResponse) or response.connection is None or response.connection.protocol is None:
            return None
        response.connection.protocol.read_timeout = None  # aiohttp sets it again for the connection's next request
        return response.content

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class Upstream:
    """One configured upstream: routing, credentials and retries over its transport."""

    def __init__(self, settings: UpstreamSettings, transport: Transport | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        # `/v1/chat/completions` -> `<base_url>/chat/completions`: base_url ends with /v1 as the SDK writes it.
        self.base_url = settings.base_url.rstrip("/")
        self._patterns = tuple(p for p in settings.models if p != "*")
        self.paths = PathFilter(settings.forward_paths)
        self.is_default = "*" in settings.models
        api_key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        # The operator's key in the header the upstream's API reads: Anthropic's Messages
        # API takes `x-api-key`, OpenAI-compatible ones `Authorization: Bearer`.
        self.format = settings.format
        self.credential: tuple[str, str] | None = None
        if api_key:
            self.credential = ("x-api-key", api_key) if settings.format == "anthropic" else ("authorization", f"Bearer {api_key}")
        self.transport: Transport = transport if transport is not None else AiohttpTransport(settings)
        self._model_cache: dict[str, ModelSettings | None] = {}
        # `url_for` per path: the base URL is fixed, so whether a path stays under it is too (bounded like the names).
        self._urls: dict[str, str] = {}
        # The client header names `forward_headers` never forwards to this upstream: fixed by its settings and key.
        self.dropped_headers: frozenset[bytes] = _dropped_headers(self.credential, settings.forward_client_credentials)

    def matches(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self._patterns)

    def model_settings(self, model: str) -> ModelSettings | None:
        try:
            return self._model_cache[model]
        except KeyError:
            found = find_model_settings(self.settings, model)
            if len(self._model_cache) < MAX_CACHED_NAMES:
                self._model_cache[model] = found
            return found

    def url_for(self, v1_path: str, query: bytes) -> str:
        """`v1_path` is the client's path without the leading `/v1`, already confined by the edge."""
        url = self._urls.get(v1_path)
        if url is None:
            if not url_within_base(self.base_url, v1_path):
                raise bad_request("the request path leaves the upstream's API", "invalid_path")
            url = self.base_url + v1_path
            if len(self._urls) < MAX_CACHED_NAMES and len(v1_path) <= 256:  # bounded in entries and their size
                self._urls[v1_path] = url
        return url + "?" + query.decode("latin-1") if query else url

    async def _request(self, method: str, url: str, headers: CIMultiDict[str], body: bytes | None) -> UpstreamResponse:
        return await self.transport.send(method, url, headers, body)

    async def send(self, method: str, url: str, headers: CIMultiDict[str], body: bytes | None) -> UpstreamResponse:
        """Send; the response body is not read yet. Retries only failures to connect."""
        try:
            return await self._request(method, url, headers, body)
        except Exception as exc:
            if self.settings.retries <= 0 or not is_connect_failure(exc):
                raise
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retries),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(is_connect_failure),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._request(method, url, headers, body)
        raise AssertionError("unreachable")  # pragma: no cover

    def hand_over_read_timeout(self, response: UpstreamResponse) -> aiohttp.StreamReader | None:
        """The body whose read timeout is now the caller's to enforce, or None where the transport keeps it."""
        return self.transport.hand_over_read_timeout(response) if isinstance(self.transport, AiohttpTransport) else None

    async def aclose(self) -> None:
        await self.transport.aclose()


class UpstreamPool:
    """Routes a model name to the first upstream whose globs match, else the `*` one."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams
        self.default = next((u for u in upstreams if u.is_default), None)
        self._route_cache: dict[str, Upstream | None] = {}
        self._format_cache: dict[tuple[str | None, str], Upstream | None] = {}

    @classmethod
    def from_settings(cls, settings: tuple[UpstreamSettings, ...], transport: Transport | None = None) -> UpstreamPool:
        """`transport` replaces aiohttp for every upstream (tests); None builds one pooled session each."""
        return cls([Upstream(s, transport) for s in settings])

    def route(self, model: str | None) -> Upstream | None:
        if model is None:
            return self.default
        try:
            return self._route_cache[model]
        except KeyError:
            found = next((u for u in self.upstreams if u.matches(model)), self.default)
            if len(self._route_cache) < MAX_CACHED_NAMES:
                self._route_cache[model] = found
            return found

    def route_format(self, model: str | None, wire: str) -> Upstream | None:
        """`route` among the upstreams that speak `wire` ("openai" or "anthropic"): a Messages
        body sent to an OpenAI upstream (or the reverse) would only come back as its 404."""
        key = (model, wire)
        try:
            return self._format_cache[key]
        except KeyError:
            same = [u for u in self.upstreams if u.format == wire]
            found = next((u for u in same if model is not None and u.matches(model)), None)
            if found is None:
                found = next((u for u in same if u.is_default), None)
            if len(self._format_cache) < MAX_CACHED_NAMES:
                self._format_cache[key] = found
            return found

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.upstreams), return_exceptions=True)


def is_connect_failure(exc: BaseException) -> bool:
    """True only when no connection was made, so nothing reached the upstream."""
    return isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(exc, aiohttp.ClientSSLError)


def classify(exc: BaseException) -> ErrorClass:
    """timeout -> 504; connect (nothing reached the upstream) and protocol (it broke the exchange) -> 502."""
    if is_connect_failure(exc):
        return "connect"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    return "protocol"


UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError, OSError)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"accept-encoding",
    }
)


# Client credentials that would travel next to the operator's key: an upstream may honour
# `api-key` (Azure) or `x-api-key` over Authorization, and organisation/project headers
# would bill the operator's key to whatever the client names.
CLIENT_CREDENTIAL_HEADERS = frozenset({b"authorization", b"api-key", b"x-api-key", b"openai-organization", b"openai-project"})


def _dropped_headers(credential: tuple[str, str] | None, forward_client_credentials: bool) -> frozenset[bytes]:
    """The client header names (lower-case) `forward_headers` drops for an upstream with this key and setting.

    Hop-by-hop headers and `x-task-type`; with the operator's key, the client's Authorization and
    whichever header carries that key (`x-api-key` for Anthropic), even with `forward_client_credentials`:
    that keeps only the others, or an Anthropic upstream would be sent the client's bearer next to the
    operator's key; without `forward_client_credentials`, the client's other credential headers too.
    """
    dropped = set(HOP_BY_HOP) | {b"x-task-type"}
    if credential is not None:
        dropped |= {b"authorization", credential[0].encode()}
        if not forward_client_credentials:
            dropped |= CLIENT_CREDENTIAL_HEADERS
    return frozenset(dropped)


def forward_headers(raw: Iterable[tuple[bytes, bytes]], upstream: Upstream) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop and Thermostat's own `x-thermostat-*`/`x-task-type`.

    `accept-encoding: identity` is asked so the response can be read for usage while
    being relayed byte for byte. When the operator's key replaces Authorization, the
    client's other credential headers go too, unless `forward_client_credentials`
    (`_dropped_headers`, computed once per upstream: one set lookup per header here).
    """
    out: CIMultiDict[str] = CIMultiDict()
    dropped = upstream.dropped_headers
    for name, value in raw:
        lname = name.lower()
        if lname in dropped or lname.startswith(b"x-thermostat-"):
            continue
        out.add(lname.decode("latin-1"), value.decode("latin-1"))
    if upstream.credential is not None:
        out[upstream.credential[0]] = upstream.credential[1]
    out["accept-encoding"] = "identity"
    return out


_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"server", b"date"})


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers to relay; the upstream's request id moves aside."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        lname = name.lower()
        if lname == b"x-request-id":
            out.append((b"x-upstream-request-id", value))
        elif lname not in _RESPONSE_DROP:
            out.append((lname, value))
    return out
