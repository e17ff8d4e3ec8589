"""Confining `/v1/*` paths to the upstream's own API before anything is forwarded.

The operator's key (`api_key_env`) is attached to every forwarded request, so a path
that climbs out of `/v1` (`/v1/../admin`, `/v1/%2e%2e/admin`) or reaches an endpoint
the operator never meant to expose (`/v1/files`, `/v1/organization/...`) would spend
that key on the client's behalf. Checks run on the raw bytes as the client sent them
and on the decoded path, because servers and HTTP clients disagree on what to decode
and normalise: anything whose meaning could change between Thermostat and the
upstream is refused rather than interpreted.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re

from proxy.edge.errors import ProxyError, bad_request

# Percent-escapes that change a path's segment structure after decoding ('/', '\\'),
# or re-encode an escape ('%25' -> a second decoding pass somewhere downstream).
_STRUCTURAL_ESCAPES = re.compile(rb"%(2f|5c|25)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def confine_v1_path(raw_path: bytes | None, path: str) -> str:
    """The path after `/v1` if it is safe to append to an upstream's base URL, else a 400.

    `path` is the ASGI decoded path (starting with `/v1/`); `raw_path` the bytes as sent.
    """
    if raw_path is not None and (_STRUCTURAL_ESCAPES.search(raw_path) or b"\\" in raw_path):
        raise bad_request("the request path contains an encoded '/', '\\\\' or '%', which Thermostat does not forward", "invalid_path")
    if _CONTROL.search(path):
        raise bad_request("the request path contains control characters or a backslash", "invalid_path")
    v1_path = path[3:]
    segments = v1_path.split("/")
    # segments[0] is the empty string before the leading '/'; a single trailing '/' is allowed.
    inner = segments[1:-1] if segments[-1] == "" else segments[1:]
    for segment in inner:
        if segment in ("", ".", ".."):
            raise bad_request("the request path has an empty, '.' or '..' segment, which Thermostat does not forward", "invalid_path")
    return v1_path


def url_within_base(base_url: str, v1_path: str) -> bool:
    """Defence in depth: the URL path after normalisation still lies under the base URL's path."""
    base_path = "/" + base_url.split("://", 1)[-1].partition("/")[2].rstrip("/")
    joined = posixpath.normpath(base_path.rstrip("/") + v1_path) if v1_path else base_path
    return joined == base_path or joined.startswith(base_path.rstrip("/") + "/")


class PathFilter:
    """The operator's `forward_paths` globs as one compiled regex (one match per request)."""

    def __init__(self, globs: tuple[str, ...]) -> None:
        self.globs = globs
        self._regex = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)) if globs else None

    def allows(self, v1_path: str) -> bool:
        return self._regex is not None and self._regex.match(v1_path) is not None

    def refusal(self, v1_path: str) -> ProxyError:
        listed = ", ".join(self.globs) or "nothing"
        return ProxyError(
            404,
            f"'/v1{v1_path}' is not forwarded by Thermostat; forwarded paths under /v1: {listed} "
            "(an operator can add more with [[upstreams]] forward_paths)",
            "path_not_forwarded",
        )
