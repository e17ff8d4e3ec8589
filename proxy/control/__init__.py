"""The control API room: `/api/optimization/*` controllers, their admin guard, schemas and reports.

The rest of the process builds a `ControlDeps` and mounts `build_control(deps)`; the
error handlers and the schema plugin go on the Litestar app so that every route, not
only the control ones, answers in the same error shape.

Names are loaded on first use: the decision room imports `proxy.control.schemas`, and
importing the controllers eagerly from here would make that a cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.control.api import build_control
    from proxy.control.auth import AdminAuth, require_token_or_opt_in
    from proxy.control.deps import ControlDeps
    from proxy.control.errors import EXCEPTION_HANDLERS, StrictStructSchemaPlugin, document_errors

__all__ = [
    "EXCEPTION_HANDLERS",
    "AdminAuth",
    "ControlDeps",
    "StrictStructSchemaPlugin",
    "build_control",
    "document_errors",
    "require_token_or_opt_in",
]

_HOME = {
    "build_control": "api",
    "AdminAuth": "auth",
    "require_token_or_opt_in": "auth",
    "ControlDeps": "deps",
    "EXCEPTION_HANDLERS": "errors",
    "StrictStructSchemaPlugin": "errors",
    "document_errors": "errors",
}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'proxy.control' has no attribute {name!r}")
    return getattr(importlib.import_module(f"proxy.control.{home}"), name)
