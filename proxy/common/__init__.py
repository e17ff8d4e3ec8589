"""The low room every other `proxy` room may use: Thermostat's own errors in the OpenAI shape,
Host/Origin parsing, `/v1` path rules, the summary of an upstream answer, the price table,
and the background-loop helpers.

It sits below `proxy.config` (which validates origins, forward paths and price providers
with it) and imports nothing from `proxy` but itself (`proxy/rooms.py`).
"""

from __future__ import annotations

from proxy.common.errors import ErrorBody, ErrorEnvelope, ProxyError, bad_request, error_body
from proxy.common.origins import host_name, normalize_origin, same_authority, split_host, valid_host_entry
from proxy.common.paths import (
    COUNTED_POSTS,
    FREE_POSTS,
    METHODS,
    PathFilter,
    confine_v1_path,
    parse_forward_path,
    spends_tokens,
    url_within_base,
)
from proxy.common.price_table import genai_rates, load_table, table_price, table_providers
from proxy.common.summary import TEXT_BLOCK, ResponseSummary, decode_chat_body, summarize_body
from proxy.common.tasks import cancel_and_wait, every, stop_within

__all__ = [
    "COUNTED_POSTS",
    "FREE_POSTS",
    "METHODS",
    "TEXT_BLOCK",
    "ErrorBody",
    "ErrorEnvelope",
    "PathFilter",
    "ProxyError",
    "ResponseSummary",
    "bad_request",
    "cancel_and_wait",
    "confine_v1_path",
    "decode_chat_body",
    "error_body",
    "every",
    "genai_rates",
    "host_name",
    "load_table",
    "normalize_origin",
    "parse_forward_path",
    "same_authority",
    "spends_tokens",
    "summarize_body",
    "split_host",
    "stop_within",
    "table_price",
    "table_providers",
    "url_within_base",
    "valid_host_entry",
]
