"""The decision room: choose what to send, turn what came back into one Outcome, and find
a decision again by request id when a later signal arrives (`feedback`: every later
signal re-enters here, whoever delivers it).
"""

from __future__ import annotations

from proxy.decision.batch import OutcomeBatch
from proxy.decision.conservative import ConservativeListener
from proxy.decision.decider import BanditDecider, BudgetExceeded, BudgetUnavailable, Decider, Explanation, QualitySignals
from proxy.decision.feedback import (
    DecisionNotFound,
    ExplicitFeedback,
    FeedbackBook,
    FeedbackConflict,
    FeedbackResult,
    FeedbackServices,
    SignalBook,
    SignalDelivery,
    apply_pending_feedback,
    context_from_features,
    deliver_signal,
    record_outcome,
)
from proxy.decision.judge_trust import JudgeTrust
from proxy.decision.lease_refill import LeaseRefiller
from proxy.decision.outcome import Pricer, Scorer, Timings, arm_label, complete, learns
from proxy.decision.prices import PriceBook
from proxy.decision.regeneration import MemoryRegenerationBook, RedisRegenerationBook, RegenerationBook, regeneration_signal
from proxy.decision.registry import DecisionRegistry

__all__ = [
    "BanditDecider",
    "BudgetExceeded",
    "BudgetUnavailable",
    "ConservativeListener",
    "Decider",
    "DecisionNotFound",
    "DecisionRegistry",
    "Explanation",
    "ExplicitFeedback",
    "FeedbackBook",
    "FeedbackConflict",
    "FeedbackResult",
    "FeedbackServices",
    "JudgeTrust",
    "LeaseRefiller",
    "MemoryRegenerationBook",
    "OutcomeBatch",
    "PriceBook",
    "Pricer",
    "QualitySignals",
    "RedisRegenerationBook",
    "RegenerationBook",
    "Scorer",
    "SignalBook",
    "SignalDelivery",
    "Timings",
    "apply_pending_feedback",
    "arm_label",
    "complete",
    "context_from_features",
    "deliver_signal",
    "learns",
    "record_outcome",
    "regeneration_signal",
]
