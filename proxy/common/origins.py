"""Host and Origin parsing for the request-forgery checks (DNS rebinding, CSRF).

Pure string functions shared by config validation, the edge's `Host` check and the
control API's `Origin` check, so all three agree on what "the same host" means.
"""

from __future__ import annotations

_DEFAULT_PORT = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """`Host` header (or an origin's authority) -> (lower-case name without brackets, port); None if malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/?#@ \\"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, tail = value[1:end], value[end + 1 :]
        if tail and not tail.startswith(":"):
            return None
        port = tail[1:] if tail else None
    elif value.count(":") > 1:  # a bare IPv6 address (config entries may be written so)
        name, port = value, None
    elif ":" in value:
        name, _, port = value.partition(":")
    else:
        name, port = value, None
    if not name:
        return None
    if port is None:
        return name, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return name, int(port)


def valid_host_entry(entry: str) -> bool:
    """An `allowed_hosts` entry: a name or address, without scheme or port."""
    parsed = split_host(entry)
    return parsed is not None and parsed[1] is None


def host_name(host_header: str | None) -> str | None:
    parsed = split_host(host_header) if host_header else None
    return parsed[0] if parsed else None


def normalize_origin(origin: str) -> str | None:
    """`scheme://host[:port]`, lower-cased, default port dropped; None if not an http(s) origin.

    Browsers send exactly this form in `Origin` (and "null" for opaque origins, which
    is not an origin here), so comparing normalized strings is exact.
    """
    scheme, sep, authority = origin.strip().lower().removesuffix("/").partition("://")
    if not sep or scheme not in _DEFAULT_PORT:
        return None
    parsed = split_host(authority)
    if parsed is None:
        return None
    name, port = parsed
    shown = f"[{name}]" if ":" in name else name
    return f"{scheme}://{shown}" + (f":{port}" if port is not None and port != _DEFAULT_PORT[scheme] else "")


def same_authority(origin: str, host_header: str | None) -> bool:
    """Whether a normalized origin names the host and port the request was addressed to.

    The scheme is not compared: behind a TLS-terminating proxy the browser's origin is
    https while this server sees plain http, and the port already tells the two apart.
    """
    scheme, _, authority = origin.partition("://")
    o = split_host(authority)
    h = split_host(host_header) if host_header else None
    if o is None or h is None or o[0] != h[0]:
        return False
    o_port = o[1] if o[1] is not None else _DEFAULT_PORT[scheme]
    return h[1] is None and o_port in _DEFAULT_PORT.values() or h[1] == o_port
