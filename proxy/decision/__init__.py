"""The decision room: choose what to send, turn what came back into one Outcome, and find
a decision again by request id when a later signal arrives (`feedback`: every later
signal re-enters here, whoever delivers it).
"""

from __future__ import annotations

from policies.quality import learns
from proxy.decision.arm_space import ArmSettings, ArmSpace, QualitySignals, declared_stand_ins, limits_for, model_limits
from proxy.decision.batch import OutcomeBatch
from proxy.decision.conservative import ConservativeListener
from proxy.decision.decider import (
    BanditDecider,
    BudgetExceeded,
    BudgetUnavailable,
    Decider,
    DeciderSettings,
    DecisionGuards,
    Explanation,
)
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
from proxy.decision.model_stage import ModelEvidence, ModelEvidenceKeeper, ModelStageSettings
from proxy.decision.outcome import Pricer, Scorer, Timings, arm_label, complete
from proxy.decision.prices import PriceBook
from proxy.decision.regeneration import MemoryRegenerationBook, RedisRegenerationBook, RegenerationBook, regeneration_signal
from proxy.decision.registry import DecisionRegistry
from proxy.decision.sampler import TwoStageSampler

__all__ = [
    "ArmSettings",
    "ArmSpace",
    "BanditDecider",
    "BudgetExceeded",
    "BudgetUnavailable",
    "ConservativeListener",
    "Decider",
    "DeciderSettings",
    "DecisionGuards",
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
    "ModelEvidence",
    "ModelEvidenceKeeper",
    "ModelStageSettings",
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
    "TwoStageSampler",
    "apply_pending_feedback",
    "arm_label",
    "complete",
    "context_from_features",
    "declared_stand_ins",
    "deliver_signal",
    "learns",
    "limits_for",
    "model_limits",
    "record_outcome",
    "regeneration_signal",
]
