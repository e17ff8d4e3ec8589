"""Learning across time and replicas: replica sync through Redis, promotion evidence from the log,
the rollout's ticker, and the listeners that learn from an answer (schema check, judge, regeneration).

Names load on first use (PEP 562), so importing one module of this room does not
import the others (evidence reads the control layer's report arrays).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.learning.evidence import compute_ope_evidence, evidence_from_arrays
    from proxy.learning.listeners import AnswerListener, AnswerValidator, JudgeCharge
    from proxy.learning.refresh import TableRefresher
    from proxy.learning.sync import SharedState
    from proxy.learning.ticker import RolloutTicker

_WHERE = {
    "AnswerListener": "listeners",
    "AnswerValidator": "listeners",
    "JudgeCharge": "listeners",
    "RolloutTicker": "ticker",
    "TableRefresher": "refresh",
    "SharedState": "sync",
    "compute_ope_evidence": "evidence",
    "evidence_from_arrays": "evidence",
}

__all__ = [
    "AnswerListener",
    "AnswerValidator",
    "JudgeCharge",
    "RolloutTicker",
    "SharedState",
    "TableRefresher",
    "compute_ope_evidence",
    "evidence_from_arrays",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'proxy.learning' has no attribute {name!r}")
    return getattr(importlib.import_module(f"proxy.learning.{module}"), name)
