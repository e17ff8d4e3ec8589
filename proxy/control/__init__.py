"""The control API room: `/api/optimization/*` controllers, their admin guard, schemas and reports.

The rest of the process builds a `ControlDeps` and mounts `build_control(deps)`; the
error handlers and the schema plugin go on the Litestar app so that every route, not
only the control ones, answers in the same error shape.
"""

from __future__ import annotations

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
