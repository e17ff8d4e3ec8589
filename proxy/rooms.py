"""The rooms of the code base, lowest first: the one place their order is declared.

A module may import from a room in a lower layer, never from a higher one nor from a
peer in its own layer (nor across the pairs in `APART`); inside a room imports are free. A package room under `proxy/` is
entered only through the names its `__init__.py` lists in `__all__`; `policies` and
`guards` are entered through their modules, and the one-module rooms (`proxy.config`,
`proxy.runtime`, ...) through the module itself. No room imports another's private
(`_`-prefixed) names. `tests/app/test_rooms.py` enforces all of it over `proxy/`,
`policies/` and `guards/`.
"""

from __future__ import annotations

ROOM_ORDER: tuple[tuple[str, ...], ...] = (
    ("policies",),
    ("guards",),
    ("proxy.common",),  # errors, origins, /v1 paths, the answer summary, the price table, loop helpers
    ("proxy.config",),
    ("proxy.store",),
    ("proxy.observability",),
    ("proxy.decision",),
    ("proxy.edge", "proxy.learning"),  # peers: they meet only in the composition root
    ("proxy.control", "proxy.demo"),
    ("proxy.runtime",),
    ("proxy.app",),
    ("proxy.workers",),
    ("proxy.cli",),
)
"""Layers, lowest first; rooms in one layer do not import each other."""

APART: frozenset[tuple[str, str]] = frozenset({
    ("proxy.control", "proxy.edge"),  # the control API gets what it needs of the edge from the composition root (ControlDeps)
})
"""(importer, imported) pairs that the layers would allow but that stay apart."""

MODULE_SURFACE = frozenset({"policies", "guards"})
"""Rooms entered through their modules (pure code with no `__init__` surface)."""

ROOMS: tuple[str, ...] = tuple(room for layer in ROOM_ORDER for room in layer)


def room_of(module: str) -> str | None:
    """The room a dotted module name belongs to (the longest room name it starts with), None outside the code base."""
    best: str | None = None
    for room in ROOMS:
        if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best)):
            best = room
    return best


def layer_of(room: str) -> int:
    return next(i for i, layer in enumerate(ROOM_ORDER) if room in layer)
