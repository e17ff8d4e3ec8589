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

from proxy.common.errors import ProxyError, bad_request

# Percent-escapes that change a path's segment structure after decoding ('/', '\\'),
# or re-encode an escape ('%25' -> a second decoding pass somewhere downstream).
_STRUCTURAL_ESCAPES = re.compile(rb"%(2f|5c|25)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


# Paths already confined (the answer is a pure function of the two): a handful of endpoints
# carry nearly all traffic. Bounded in entries and in their size: once full, or for a long
# path, the checks simply run each time.
_CONFINED: dict[tuple[bytes | None, str], str] = {}
_MAX_CONFINED = 1024
_MAX_CONFINED_CHARS = 256


def confine_v1_path(raw_path: bytes | None, path: str) -> str:
    """The path after `/v1` if it is safe to append to an upstream's base URL, else a 400.

    `path` is the ASGI decoded path (starting with `/v1/`); `raw_path` the bytes as sent.
    A path accepted once is remembered (`_CONFINED`); a refused one is checked every time.
    """
    key = (raw_path, path)
    found = _CONFINED.get(key)
    if found is None:
        found = _confine(raw_path, path)
        if len(_CONFINED) < _MAX_CONFINED and len(path) <= _MAX_CONFINED_CHARS and (raw_path is None or len(raw_path) <= _MAX_CONFINED_CHARS):
            _CONFINED[key] = found
    return found


def _confine(raw_path: bytes | None, path: str) -> str:
    """`confine_v1_path`'s checks, uncached."""
    if raw_path is not None and (_STRUCTURAL_ESCAPES.search(raw_path) or b"\\" in raw_path):
        raise bad_request("the request path contains an encoded '/', '\\\\' or '%', which Thermostat does not forward", "invalid_path")
    if _CONTROL.search(path):
        raise bad_request("the request path contains control characters or a backslash", "invalid_path")
    v1_path = path[3:]
    segments = v1_path.split("/")
    # segments[0] is the empty string before the leading '/'; a single trailing '/' is allowed.
    inner = segments[1:-1] if segments[-1] == "" else segments[1:]
    for segment in inner:
        if segment in ("", ".", "..") or (";" in segment and segment.split(";", 1)[0] in ("", ".", "..")):
            # `..;` and `.;x`: servers that read `;` as a parameter (Tomcat, Spring) see a `..` there.
            raise bad_request("the request path has an empty, '.' or '..' segment, which Thermostat does not forward", "invalid_path")
    # One trailing '/' names the same endpoint (`/v1/messages/` is `/v1/messages`): decided,
    # budgeted and filtered as such, never passed through beside the rules of its twin.
    return v1_path[:-1] if len(v1_path) > 1 and v1_path.endswith("/") else v1_path


def url_within_base(base_url: str, v1_path: str) -> bool:
    """Defence in depth: the URL path after normalisation still lies under the base URL's path."""
    base_path = "/" + base_url.split("://", 1)[-1].partition("/")[2].rstrip("/")
    joined = posixpath.normpath(base_path.rstrip("/") + v1_path) if v1_path else base_path
    return joined == base_path or joined.startswith(base_path.rstrip("/") + "/")


# Methods a `forward_paths` entry may name ("GET /models"); an entry without one allows any method.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def parse_forward_path(entry: str) -> tuple[str | None, str] | None:
    """(method or None, glob) of a `forward_paths` entry, None if it is not one (config validation)."""
    method, sep, glob = entry.partition(" ")
    if not sep:
        method, glob = "", entry
    elif method not in METHODS:
        return None
    if not glob.startswith("/") or ".." in glob or " " in glob:
        return None
    return (method or None), glob


class PathFilter:
    """The operator's `forward_paths` (globs over the path after /v1, each optionally for one
    method) as one compiled regex over "METHOD /path" (one match per request)."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.globs = entries
        parts = []
        for entry in entries:
            parsed = parse_forward_path(entry)
            if parsed is None:
                raise ValueError(f"not a forward_paths entry: {entry!r}")
            method, glob = parsed
            parts.append(f"(?:{re.escape(method) if method else '[A-Z]+'} {fnmatch.translate(glob)})")
        self._regex = re.compile("|".join(parts)) if parts else None

    def allows(self, method: str, v1_path: str) -> bool:
        return self._regex is not None and self._regex.match(f"{method} {v1_path}") is not None

    def refusal(self, method: str, v1_path: str) -> ProxyError:
        listed = ", ".join(self.globs) or "nothing"
        return ProxyError(
            404,
            f"'{method} /v1{v1_path}' is not forwarded by Thermostat; forwarded under /v1: {listed} "
            "(an operator can add more with [[upstreams]] forward_paths)",
            "path_not_forwarded",
        )


# POSTs that answer without spending model tokens: counting and moderation.
FREE_POSTS = frozenset({"/messages/count_tokens", "/responses/input_tokens", "/moderations"})
# Passed-through POSTs whose answers report their usage, which the edge reads and counts.
COUNTED_POSTS = frozenset({"/embeddings"})
# Methods that read or remove and never generate.
_NON_SPENDING = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def spends_tokens(method: str, v1_path: str) -> bool:
    """Whether a passed-through request may spend model tokens (a batch, an image, a transcript...)."""
    return method not in _NON_SPENDING and v1_path not in FREE_POSTS
