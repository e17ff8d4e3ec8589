"""The walls between rooms (`proxy/rooms.py`), read from the source in the style of httpx's
tests/test_exported_members.py: what a room exports is what it lists, and other rooms go through it."""

from __future__ import annotations

import importlib

import pytest

from proxy.rooms import MODULE_SURFACE, ROOMS, layer_of, room_of
from tests.support.rooms import Import, against_order, bypasses_surface, code_files, imports_of, past_surface, surface

CODE_IMPORTS = [imp for path in code_files() for imp in imports_of(path)]
PACKAGE_ROOMS = [room for room in ROOMS if room not in MODULE_SURFACE and surface(room) is not None]


def test_no_import_runs_against_the_room_order() -> None:
    found = [why for imp in CODE_IMPORTS if (why := against_order(imp))]
    assert found == []


def test_rooms_are_entered_only_through_their_surface() -> None:
    found = [why for imp in CODE_IMPORTS if (why := past_surface(imp))]
    assert found == []


def test_tests_use_a_surface_where_it_has_the_name() -> None:
    """A test may read a room's internals (a unit test of them), but not past a surface that exports the name."""
    found = [why for path in code_files(("tests",)) for imp in imports_of(path) if (why := bypasses_surface(imp))]
    assert found == []


@pytest.mark.parametrize("room", PACKAGE_ROOMS)
def test_exported_members(room: str) -> None:
    """Every name in `__all__` exists, and every public class or function a room's `__init__` binds is in `__all__`."""
    module = importlib.import_module(room)
    exported = set(module.__all__)
    assert exported == surface(room)
    for name in exported:
        assert getattr(module, name) is not None, name
    bound = {name for name, value in vars(module).items() if not name.startswith("_") and _home(value).startswith(room + ".")}
    assert bound <= exported, sorted(bound - exported)


def _home(value: object) -> str:
    """The module a class, function or submodule comes from ("" for plain values such as constants)."""
    if isinstance(value, type(importlib)):
        return ""  # submodules are bound on import; a room exports one (proxy.demo's) by listing it
    home = getattr(value, "__module__", None)
    return home if isinstance(home, str) else ""


def test_the_checks_catch_what_they_are_for() -> None:
    """The finders themselves: an upward import, a peer import, a way past a surface, a private name."""
    assert against_order(Import("proxy/config.py", 1, "proxy.config", "proxy.edge", "ProxyEdge"))
    assert against_order(Import("proxy/learning/x.py", 1, "proxy.learning.x", "proxy.edge", "CHAT"))
    assert against_order(Import("proxy/edge/asgi.py", 1, "proxy.edge.asgi", "proxy.decision", "complete")) is None
    assert against_order(Import("proxy/control/x.py", 1, "proxy.control.x", "proxy.edge", "CHAT"))  # apart, though higher
    assert past_surface(Import("proxy/edge/asgi.py", 1, "proxy.edge.asgi", "proxy.decision.outcome", "complete"))
    assert past_surface(Import("proxy/edge/asgi.py", 1, "proxy.edge.asgi", "proxy.decision", "no_such_name"))
    assert past_surface(Import("proxy/decision/x.py", 1, "proxy.decision.x", "proxy.store", "_private"))
    assert past_surface(Import("proxy/edge/asgi.py", 1, "proxy.edge.asgi", "proxy.edge.sse", "StreamRelay")) is None
    assert room_of("proxy.edge.formats.chat") == "proxy.edge" and room_of("proxy") is None
    assert layer_of("proxy.common") < layer_of("proxy.config") < layer_of("proxy.decision") < layer_of("proxy.edge") == layer_of("proxy.learning")
