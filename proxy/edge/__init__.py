"""The edge: ASGI entry for `/v1/*`, body checks, the wire-format adapters, the upstream client and the SSE relay.

Other rooms import these names from here; the modules behind them are private to the edge.
"""

from __future__ import annotations

from proxy.edge.asgi import EdgeServices, Message, ProxyEdge, Receive, Scope, Send
from proxy.edge.formats import CHAT
from proxy.edge.formats.anthropic import anthropic_error_type
from proxy.edge.listeners import Finished, HandOverAnswer, Listener, LogOutcome, OnOutcome, RecordMetrics, RecordSpan
from proxy.edge.read_watch import ReadWatch
from proxy.edge.serving import ServingConfig
from proxy.edge.sse import StreamRelay
from proxy.edge.upstream import AiohttpTransport, Transport, Upstream, UpstreamPool, UpstreamResponse

__all__ = [
    "AiohttpTransport",
    "CHAT",
    "EdgeServices",
    "Finished",
    "HandOverAnswer",
    "Listener",
    "LogOutcome",
    "Message",
    "OnOutcome",
    "ProxyEdge",
    "ReadWatch",
    "Receive",
    "RecordMetrics",
    "RecordSpan",
    "Scope",
    "Send",
    "ServingConfig",
    "StreamRelay",
    "Transport",
    "Upstream",
    "UpstreamPool",
    "UpstreamResponse",
    "anthropic_error_type",
]
