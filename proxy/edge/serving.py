"""uvicorn's httptools protocol with the limits uvicorn lacks, so slow clients cannot pin file descriptors.

uvicorn only times out idle keep-alive connections: a client that connects and sends
nothing, or trickles its headers or body a byte at a time, holds its socket forever
(500 such connections held 500 fds for as long as the clients liked). Here every
request has a deadline for its headers (from the connection, or from the first byte of
a later keep-alive request) and one for its body (from the end of the headers), and
missing either gets a 408 in the OpenAI error shape before the connection closes;
request line and headers over `MAX_HEADER_BYTES` get a 431 (httptools sets no bound).
Beyond `server.max_connections` open connections a request gets a 503 in the same
shape instead of uvicorn's `text/plain` one, and a client address that already holds
`server.max_connections_per_client` gets it for any new connection at once (3,000 idle
sockets of one client used to hold the global cap, a 503 for everyone for ~10 s).
The limits are per process.

The settings travel on the uvicorn `Config` (a subclass, so `--workers` can pickle it
to its worker processes), and the protocol is named by import path for the same reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.common import ProxyError, error_body
from proxy.config import ServerSettings
from proxy.edge.formats import own_error

PROTOCOL = "proxy.edge.serving:GuardedHttpToolsProtocol"
# Request line + headers of one request. httptools sets no bound of its own, so within
# the header deadline a client could otherwise make a connection buffer any amount.
MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 1.0


class ServingConfig(uvicorn.Config):
    """A uvicorn `Config` carrying Thermostat's connection limits to the protocol."""

    def __init__(self, app: Any, *, server: ServerSettings, **kwargs: Any) -> None:
        # A burst of new connections waits in the listen queue while the loop is busy; uvicorn's
        # 2,048 overflowed under the LLM-shaped load (bench/README.md), and every dropped SYN costs
        # its client a retry of a second or more. The kernel caps this at net.core.somaxconn.
        kwargs.setdefault("backlog", max(2048, server.max_connections))
        super().__init__(app, http=PROTOCOL, **kwargs)
        self.header_timeout_s = server.header_timeout_s
        self.body_timeout_s = server.body_timeout_s
        self.max_connections = server.max_connections
        self.max_connections_per_client = server.max_connections_per_client
        self.uncapped_peers = tuple(ipaddress.ip_network(p.strip(), strict=False) for p in server.forwarded_allow_ips)


def _raw_response(status: int, reason: bytes, body: bytes, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n" % (
        status, reason, len(body), extra)
    return head + body


class ClientCounts:
    """Open connections per client address, for one server (its protocols share `server_state`)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    @staticmethod
    def of(server_state: Any) -> ClientCounts:
        counts: ClientCounts | None = getattr(server_state, "thermostat_clients", None)
        if counts is None:
            counts = ClientCounts()
            server_state.thermostat_clients = counts
        return counts

    def add(self, host: str) -> None:
        self.open[host] = self.open.get(host, 0) + 1

    def remove(self, host: str) -> None:
        left = self.open.get(host, 0) - 1
        if left > 0:
            self.open[host] = left
        else:
            self.open.pop(host, None)


_BUSY = ProxyError(503, "too many open connections; retry shortly", "server_busy", "server_error")
_PER_CLIENT_BODY = error_body("too many open connections from this client address ([server] max_connections_per_client); "
                              "retry shortly", "server_error", "server_busy")


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The answer beyond `max_connections` (uvicorn's own is text/plain), in the shape of the path's format."""
    body = own_error(scope.get("path", ""), _BUSY)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: uvicorn's parser and request cycle, plus header/body deadlines and a connection cap."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s: float | None = getattr(config, "header_timeout_s", None)
        self.body_timeout_s: float | None = getattr(config, "body_timeout_s", None)
        self.max_connections: int | None = getattr(config, "max_connections", None) or config.limit_concurrency
        self.limit_concurrency = None  # replaced by the check below, which answers in the OpenAI shape
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._discarding = False
        self.per_client: int = getattr(config, "max_connections_per_client", 0) or 0
        self.uncapped_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = getattr(config, "uncapped_peers", ())
        self.clients = ClientCounts.of(server_state)
        self._counted: str | None = None  # the client address this connection is counted under

    def _arm(self, seconds: float | None, callback: Any) -> None:
        self._disarm()
        if seconds is not None:
            self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if self.per_client and host is not None and not self._uncapped(host):
            if self.clients.open.get(host, 0) >= self.per_client:
                # Refused before it can hold anything: one client's sockets (idle ones above all)
                # must not fill `max_connections` for every other client.
                self._reject(503, b"Service Unavailable", _PER_CLIENT_BODY, b"retry-after: 1\r\n")
                self.connections.discard(self)  # lingering to be read, it holds no place under `max_connections`
                return
            self.clients.add(host)
            self._counted = host
        self._arm(self.header_timeout_s, self._headers_late)

    def _uncapped(self, host: str) -> bool:
        if not self.uncapped_peers:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.uncapped_peers)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted is not None:
            self.clients.remove(self._counted)
            self._counted = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm(self.header_timeout_s, self._headers_late)

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        super().on_header(name, value)

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            body = self._own_error(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes", "headers_too_large")
            self._reject(431, b"Request Header Fields Too Large", body)
            raise httptools.HttpParserError("headers too large")  # stops the parser; see send_400_response

    def _own_error(self, status: int, message: str, code: str) -> bytes:
        """A refusal in the shape of the request path's format, as far as the path has arrived."""
        url: bytes = getattr(self, "url", b"")  # uvicorn sets it when a request begins
        path = url.partition(b"?")[0].decode("latin-1")
        return own_error(path, ProxyError(status, message, code))

    def _reject(self, status: int, reason: bytes, body: bytes, extra: bytes = b"") -> None:
        """Answer and close. A client may still be sending: closing at once would reset the
        connection and discard the answer before the client reads it, so the answer is
        followed by a FIN and input is dropped for a moment before the socket closes."""
        self._discarding = True
        self.transport.write(_raw_response(status, reason, body, extra))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._discarding:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if not self._discarding:  # not after a response of our own (431)
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._disarm()
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            app, self.app = self.app, _busy
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._arm(self.body_timeout_s, self._body_late)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request is late while the previous one is still being answered:
            # finish that answer, then close.
            self.cycle.keep_alive = False
            return
        body = self._own_error(408, f"request headers not received within {self.header_timeout_s:g} s", "request_timeout")
        self._reject(408, b"Request Timeout", body)

    def _body_late(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if not cycle.response_started:
            # The app sees a disconnect (so it stops waiting for the body) and whatever it
            # sends afterwards is dropped by uvicorn; the client gets the 408.
            cycle.disconnected = True
            cycle.message_event.set()
            body = self._own_error(408, f"request body not received within {self.body_timeout_s:g} s", "request_timeout")
            self._reject(408, b"Request Timeout", body)
        else:
            self.transport.close()

