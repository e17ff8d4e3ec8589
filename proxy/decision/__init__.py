"""The decision room: choose what to send, turn what came back into one Outcome, and find
a decision again by request id when a later signal arrives.

`feedback` (delayed explicit quality) is not re-exported yet: it still speaks the
control API's request/response structs (see docs/architecture.md, "Left to do").
"""

from __future__ import annotations

from proxy.decision.decider import BanditDecider, BudgetExceeded, BudgetUnavailable, Decider, Explanation
from proxy.decision.outcome import Timings, arm_label, complete, learns
from proxy.decision.registry import DecisionRegistry

__all__ = [
    "BanditDecider",
    "BudgetExceeded",
    "BudgetUnavailable",
    "Decider",
    "DecisionRegistry",
    "Explanation",
    "Timings",
    "arm_label",
    "complete",
    "learns",
]
