"""The edge: ASGI entry for `/v1/*`, body checks, the upstream client and the SSE relay.

Other rooms import these names from here; the modules behind them are private. They
load on first use (PEP 562): `proxy.config` validates origins with `proxy.edge.origins`,
and an eager import of the ASGI app from here would pull the whole edge into config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.edge.asgi import EdgeServices, ProxyEdge
    from proxy.edge.errors import ProxyError, bad_request, error_body
    from proxy.edge.sse import ResponseSummary, StreamRelay, summarize_body
    from proxy.edge.upstream import AiohttpTransport, Transport, Upstream, UpstreamPool, UpstreamResponse

_WHERE = {
    "EdgeServices": "asgi",
    "ProxyEdge": "asgi",
    "ProxyError": "errors",
    "bad_request": "errors",
    "error_body": "errors",
    "ResponseSummary": "sse",
    "StreamRelay": "sse",
    "summarize_body": "sse",
    "AiohttpTransport": "upstream",
    "Transport": "upstream",
    "Upstream": "upstream",
    "UpstreamPool": "upstream",
    "UpstreamResponse": "upstream",
}

__all__ = [
    "AiohttpTransport",
    "EdgeServices",
    "ProxyEdge",
    "ProxyError",
    "ResponseSummary",
    "StreamRelay",
    "Transport",
    "Upstream",
    "UpstreamPool",
    "UpstreamResponse",
    "bad_request",
    "error_body",
    "summarize_body",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'proxy.edge' has no attribute {name!r}")
    return getattr(importlib.import_module(f"proxy.edge.{module}"), name)
