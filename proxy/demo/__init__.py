"""The demo: a simulated upstream (with its own judge), demo traffic and a small local model.

Only the command line and the tests enter it. Its names load on first use (PEP 562), so
`thermostat` commands that do not run the demo never import aiohttp's server or the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.demo import local_model, traffic
    from proxy.demo.simulator import DEFAULT_MODEL_PROFILES
    from proxy.demo.simulator_server import JUDGE_PREFIX, start_simulator
    from proxy.demo.simulator_server import run as run_simulator
    from proxy.demo.traffic import LOCAL_TEMPERATURE

_WHERE = {
    "DEFAULT_MODEL_PROFILES": ("simulator", "DEFAULT_MODEL_PROFILES"),
    "JUDGE_PREFIX": ("simulator_server", "JUDGE_PREFIX"),
    "LOCAL_TEMPERATURE": ("traffic", "LOCAL_TEMPERATURE"),
    "run_simulator": ("simulator_server", "run"),
    "start_simulator": ("simulator_server", "start_simulator"),
}
_MODULES = frozenset({"local_model", "traffic"})

__all__ = ["DEFAULT_MODEL_PROFILES", "JUDGE_PREFIX", "LOCAL_TEMPERATURE", "local_model", "run_simulator", "start_simulator", "traffic"]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"proxy.demo.{name}")
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'proxy.demo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"proxy.demo.{where[0]}"), where[1])
